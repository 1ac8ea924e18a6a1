"""`weaktr train-cam`: train the WeakTr CAM model from image-level labels."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from weaktr_cli.commands import options
from weaktr_cli.commands.output import Output

HELP = """Train the WeakTr CAM model (phase 1) from image-level labels.

Starts from the recipe of the dataset (--recipe; the paper's for voc/coco, a CPU-sized one for
the built-in shapes) and overrides what you pass. The checkpoint describes itself (architecture,
fusion, classes, training arguments) and loads without pickle. Runs unchanged under torchrun.

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
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write.")] = Path(
        "cam.ckpt"),
    recipe: Annotated[str | None, typer.Option(
        help="Starting settings: shapes, voc or coco (default: the dataset's).")] = None,
    arch: Annotated[str | None, typer.Option(help="Backbone (e.g. deit-small, tiny-p8).")] = None,
    fusion: Annotated[str | None, typer.Option(help="aaf, aaf-feat or mean-sum.")] = None,
    aaf_pool: Annotated[str | None, typer.Option(help="AAF pooling: avg or max.")] = None,
    pretrained: Annotated[Path | None, typer.Option(
        help="Local ImageNet ViT weights (.pth or .safetensors); never downloaded.")] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    lr: Annotated[float | None, typer.Option(
        help="Base learning rate per 512 images (scaled by the effective batch).")] = None,
    accum_steps: Annotated[int | None, typer.Option(min=1, help="Gradient accumulation.")] = None,
    input_size: Annotated[int | None, typer.Option(min=8, help="Training crop size.")] = None,
    select: Annotated[str, typer.Option(
        help="Checkpoint to keep: last, val-map (image labels only) or cam-miou "
        "(scores CAMs with PIXEL labels of --val-split: opt-in).")] = "last",
    precision: Annotated[str | None, typer.Option(help="auto, fp32, bf16 or fp16.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run of --out.")] = False,
    log_jsonl: Annotated[Path | None, typer.Option(
        help="Per-epoch JSONL log (default: OUT.jsonl).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default: the recipe's).")] = None,
    device: options.Device = "auto",
    workers: Annotated[int | None, typer.Option(min=0, help="Data loader workers.")] = None,
    json_mode: options.Json = False,
    quiet: options.Quiet = False,
) -> None:
    from weaktr_cli.data import open_dataset
    from weaktr_cli.errors import WeakTrError
    from weaktr_cli.recipes import CAM_RECIPES
    from weaktr_cli.runtime import dist_info_from_env
    from weaktr_cli.train_cam import train_cam as run

    output = Output(json_mode=json_mode, quiet=quiet or not dist_info_from_env().is_main)
    recipe_name = recipe or str(data)
    if recipe_name not in CAM_RECIPES:
        raise WeakTrError(f"unknown recipe {recipe_name!r}",
                          hint=f"choose one of {', '.join(CAM_RECIPES)}")
    overrides: dict[str, Any] = {
        "arch": arch, "fusion": fusion, "aaf_pool": aaf_pool, "epochs": epochs,
        "batch_size": batch_size, "base_lr": lr, "accum_steps": accum_steps,
        "input_size": input_size, "precision": precision, "seed": seed, "workers": workers,
    }
    config = dataclasses.replace(CAM_RECIPES[recipe_name], select=select,
                                 **{k: v for k, v in overrides.items() if v is not None})
    train_set = open_dataset(data, split, data_root)
    val_set = None if val_split == "none" else open_dataset(data, val_split, data_root)
    cam_miou = None
    if select == "cam-miou":
        if val_set is None:
            raise WeakTrError("--select cam-miou needs --val-split")
        output.log(f"[yellow]--select cam-miou scores CAMs with the pixel labels of "
                   f"{val_set.split!r}: not a weakly-supervised protocol[/]")
        cam_miou = _cam_miou_scorer(val_set, recipe_name)
    with output.progress("train-cam") as update:
        result = run(train_set, val_set, out, config, pretrained=pretrained, resume=resume,
                     device=device, log=output.log,
                     log_jsonl=log_jsonl or out.with_name(out.name + ".jsonl"),
                     progress=update, cam_miou_fn=cam_miou)
    last = result.history[-1] if result.history else {}
    output.artifact(result.checkpoint, {"selected_epoch": result.selected_epoch,
                                        "final": last, "config": config.to_dict()})


def _cam_miou_scorer(val_set, recipe_name: str):
    """CAM mIoU (best threshold) of a model on val_set, for the opt-in selection."""
    import tempfile

    from weaktr_cli.artifacts import open_artifact
    from weaktr_cli.cams import dump_cams
    from weaktr_cli.evaluation import evaluate_artifact
    from weaktr_cli.metrics import default_thresholds
    from weaktr_cli.recipes import DUMP_RECIPES

    def score(model) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            path = dump_cams(model, val_set, Path(tmp) / "cams.h5",
                             settings=DUMP_RECIPES[recipe_name], resume=False)
            with open_artifact(path) as reader:
                result = evaluate_artifact(reader, val_set, thresholds=default_thresholds())
        model.train()
        return result.scores.miou

    return score
