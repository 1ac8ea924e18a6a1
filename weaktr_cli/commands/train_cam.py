"""`weaktr train-cam`: train the WeakTr CAM model from image-level labels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from weaktr_cli.commands import options
from weaktr_cli.commands.output import Output

HELP = """Train the WeakTr CAM model (phase 1) from image-level labels.

Starts from the recipe of the dataset (--recipe; for voc/coco the reference's release code,
--recipe paper for the paper's, docs/REPRODUCING.md; a CPU-sized one for the built-in shapes)
and overrides what you pass. The checkpoint describes itself (architecture,
fusion, classes, training arguments) and loads without pickle. Runs unchanged under torchrun.
The voc and coco recipes fine-tune ImageNet weights: pass --pretrained (or --from-scratch).

Beside OUT, training keeps OUT.last (the newest epoch's weights) and OUT.state (optimizer,
scheduler, RNG: about twice the weights) for --resume, and OUT.jsonl (the log). Delete .last
and .state once the run is done; `weaktr inspect OUT` lists them.

[dim]Examples:[/]
  weaktr train-cam                                    # built-in shapes, CPU recipe
  weaktr train-cam --data voc --data-root ~/VOCdevkit --pretrained deit_small.pth --out cam.ckpt
  torchrun --nproc-per-node 4 -m weaktr_cli train-cam --data voc --data-root ~/VOCdevkit ...
"""



def train_cam(
    data: options.Data = options.DatasetName.shapes,
    data_root: options.DataRoot = None,
    split: options.Split = "train",
    val_split: Annotated[str, typer.Option(
        help="Split for image-level validation mAP ('none' to skip).")] = "val",
    out: Annotated[Path, options.out("Checkpoint to write.")] = Path("cam.ckpt"),
    recipe: options.Recipe = None,
    arch: Annotated[str | None, typer.Option(help="Backbone (e.g. deit-small, tiny-p8).")] = None,
    fusion: Annotated[str | None, typer.Option(
        help="aaf, aaf-feat, aaf-rand (random-query ablation) or mean-sum.")] = None,
    aaf_pool: Annotated[str | None, typer.Option(help="AAF pooling: avg or max.")] = None,
    aaf_reduction: Annotated[float | None, typer.Option(
        help="AAF head-FFN reduction r: hidden int(layers x heads / r), "
        "fractional allowed (default: the recipe's).")] = None,
    pretrained: Annotated[Path | None, typer.Option(
        help="Local ImageNet ViT weights (.pth or .safetensors); never downloaded.")] = None,
    from_scratch: options.FromScratch = False,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    lr: Annotated[float | None, typer.Option(
        help="Base learning rate per 512 images (scaled by the effective batch).")] = None,
    accum_steps: Annotated[int | None, typer.Option(min=1, help="Gradient accumulation.")] = None,
    input_size: Annotated[int | None, typer.Option(min=8, help="Training crop size.")] = None,
    select: Annotated[str, typer.Option(
        help="Checkpoint to keep: last, val-map (image labels only) or cam-miou "
        "(scores CAMs with PIXEL labels of --val-split: opt-in).")] = "last",
    *,
    training: Annotated[options.TrainingFlags, options.training_flags("epoch")],
    output: Annotated[Output, options.TRAINING_OUTPUT],
) -> None:
    from weaktr_cli.phases import train_cam_run

    overrides: dict[str, Any] = {
        "arch": arch, "fusion": fusion, "aaf_pool": aaf_pool, "aaf_reduction": aaf_reduction,
        "epochs": epochs, "batch_size": batch_size, "base_lr": lr, "accum_steps": accum_steps,
        "input_size": input_size, "select": select, **training.overrides(),
    }
    result, config = train_cam_run(
        data=str(data), split=split, val_split=None if val_split == "none" else val_split,
        data_root=data_root, out=out, recipe=recipe, overrides=overrides,
        pretrained=pretrained, from_scratch=from_scratch, resume=training.resume,
        device=training.device, log_jsonl=training.log_jsonl, log=output.log, bar=output.progress)
    last = result.history[-1] if result.history else {}
    output.artifact(result.checkpoint, {"selected_epoch": result.selected_epoch,
                                        "final": last, "config": config.to_dict()})
