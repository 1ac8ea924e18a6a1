"""`weaktr retrain`: online retraining on seeds with the gradient clipping decoder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from weaktr_cli.commands import options
from weaktr_cli.commands.output import Output

HELP = """Retrain a segmentation model on pseudo-label seeds (phase 4).

A ViT encoder with a
Segmenter decoder (--decoder mask: the mask transformer, the paper's; linear: one linear layer)
and the gradient clipping loss (once the mean loss is below --tau,
pixels whose loss exceeds max(patch mean, global mean) over --patch x --patch patches get no
gradient). --seeds takes a labels artifact (from crf) or a cams artifact, turned into seeds on
the fly with --bg. --tau auto sets the threshold from the loss of the first epoch (for data
whose loss scale differs from VOC's, where 1.2 is the paper's value).
The voc and coco recipes start the encoder from ImageNet weights: pass --pretrained (or
--from-scratch).

Beside OUT, training keeps OUT.last (the newest weights) and OUT.state (optimizer, scheduler,
RNG: about twice the weights) for --resume, and OUT.jsonl (the log). Delete .last and .state
once the run is done; `weaktr inspect OUT` lists them.

[dim]Examples:[/]
  weaktr retrain --seeds seeds.h5 --out seg.ckpt                     # built-in dataset
  weaktr retrain --seeds cams.h5 --tau 1.2 --data voc --data-root ~/VOCdevkit --pretrained vit_s.pth
  weaktr retrain --seeds seeds.h5 --no-clip --out naive.ckpt          # the naive decoder baseline
  torchrun --nproc-per-node 4 -m weaktr_cli retrain --seeds seeds.h5 --data voc ...
"""


def retrain(
    seeds: Annotated[Path, typer.Option("--seeds", help="labels (or cams) artifact to train on.")],
    data: options.DataOptional = None,
    data_root: options.DataRoot = None,
    out: Annotated[Path, options.out("Checkpoint to write.")] = Path("seg.ckpt"),
    recipe: options.Recipe = None,
    tau: Annotated[str | None, typer.Option(
        help="Clipping threshold: a number or 'auto' (default: the recipe's).")] = None,
    patch: Annotated[int | None, typer.Option(min=1, help="Clipping patch size S.")] = None,
    clip: Annotated[bool | None, typer.Option(
        "--clip/--no-clip", show_default=False,
        help="Gradient clipping (off: plain CE). Default: on with --tau, else the recipe's.",
    )] = None,
    bg: Annotated[float | None, typer.Option(
        help="Background threshold when --seeds is a cams artifact.")] = None,
    cams: Annotated[Path | None, typer.Option(
        help="CAMs that mark ambiguous seed pixels (default: those the seeds were made "
        "from).")] = None,
    ambiguity: Annotated[str | None, typer.Option(
        help="Ignore seed pixels where another class's CAM is >= this ratio of the seed "
        "class's, or none (default: the recipe's).")] = None,
    arch: Annotated[str | None, typer.Option(help="Encoder (vit-small, deit-small, ...).")] = None,
    decoder: Annotated[str | None, typer.Option(
        help="mask (mask transformer) or linear (default: the recipe's).")] = None,
    pretrained: Annotated[Path | None, typer.Option(
        help="Encoder initialisation: local ImageNet ViT weights, or a train-cam checkpoint "
        "of the same backbone.")] = None,
    from_scratch: options.FromScratch = False,
    crop_size: Annotated[int | None, typer.Option(min=8)] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    iterations: Annotated[int | None, typer.Option(min=1, help="Optimizer steps (overrides "
                                                   "--epochs).")] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    *,
    training: Annotated[options.TrainingFlags, options.training_flags("step")],
    output: Annotated[Output, options.TRAINING_OUTPUT],
) -> None:
    from weaktr_cli.phases import retrain_run

    overrides: dict[str, Any] = {
        "clip_patch": patch, "arch": arch, "decoder": decoder,
        "crop_size": crop_size, "batch_size": batch_size, "epochs": epochs,
        "iterations": iterations, "lr": lr, **training.overrides()}
    result, config = retrain_run(
        seeds=seeds, data=None if data is None else str(data), data_root=data_root, out=out,
        recipe=recipe, overrides=overrides, tau=tau, clip=clip, bg=bg, pretrained=pretrained,
        from_scratch=from_scratch, resume=training.resume, cams=cams, ambiguity=ambiguity,
        device=training.device, log_jsonl=training.log_jsonl, log=output.log,
        bar=output.progress)
    output.artifact(result.checkpoint, {"tau": result.tau, "steps": result.steps,
                                        "config": config.to_dict()})
