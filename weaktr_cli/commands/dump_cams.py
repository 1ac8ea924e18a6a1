"""`weaktr dump-cams`: multi-scale + flip CAMs of a split into a `cams` artifact."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from weaktr_cli.commands import options
from weaktr_cli.commands.output import Output

HELP = """Run CAM inference over a split into a cams artifact (phase 2).

Multi-scale plus flip, the classes of each image's image-level label only, min-max normalised
(docs/method.md). Resumable: rerun the same command after an interruption. Prints the artifact path.

[dim]Examples:[/]
  weaktr dump-cams --checkpoint cam.ckpt --out cams.h5
  weaktr dump-cams --checkpoint cam.ckpt --data voc --data-root ~/VOCdevkit --split train_aug \\
      --scales 1.0,1.2 --out cams.h5
  weaktr dump-cams --reference-checkpoint WeakTr_CAM.pth --data voc --data-root ~/VOCdevkit ...
  weaktr crf --cams "$(weaktr dump-cams --checkpoint cam.ckpt -q)"
"""


def dump_cams(
    checkpoint: Annotated[Path | None, typer.Option(
        help="A weaktr CAM checkpoint from train-cam.")] = None,
    reference_checkpoint: Annotated[Path | None, typer.Option(
        help="An official hustvl/WeakTr CAM checkpoint (.pth) instead.")] = None,
    data: options.DataOptional = None,
    data_root: options.DataRoot = None,
    split: options.Split = "train",
    out: Annotated[Path, options.out("The cams artifact.")] = Path("cams.h5"),
    recipe: options.Recipe = None,
    scales: Annotated[str | None, typer.Option(
        help="Comma-separated scales (default: the dataset's recipe).")] = None,
    flip: Annotated[bool | None, typer.Option("--flip/--no-flip",
                                              help="Add horizontally flipped passes.")] = None,
    variant: Annotated[str | None, typer.Option(
        help="CAM variant: fine (WeakTr), cross (cross-attention x coarse) or coarse.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per batch.")] = None,
    max_size: Annotated[int | None, typer.Option(
        min=0, help="Longest image side the model sees, before --scales (default 1024; 0: no "
        "limit). CAMs are still written at full size; bounds the memory of large photos.")
    ] = None,
    precision: Annotated[str | None, typer.Option(
        help="auto (bf16 on CPUs with native bf16), fp32, bf16 or fp16.")] = None,
    shard: options.Shard = None,
    resume: options.ResumePartial = True,
    device: options.Device = "auto",
    *,
    output: Annotated[Output, options.OUTPUT],
) -> None:
    from weaktr_cli.errors import WeakTrError
    from weaktr_cli.phases import dump_cams_run
    from weaktr_cli.shards import parse_shard

    overrides: dict[str, Any] = {"flip": flip, "variant": variant, "batch_size": batch_size,
                                 "precision": precision}
    if scales is not None:
        try:
            overrides["scales"] = tuple(float(s) for s in scales.split(","))
        except ValueError:
            raise WeakTrError(f"invalid --scales {scales!r}", hint="e.g. 1.0,1.2") from None
    path, dataset, settings = dump_cams_run(
        checkpoint=checkpoint, reference_checkpoint=reference_checkpoint,
        data=None if data is None else str(data), split=split, data_root=data_root, out=out,
        overrides=overrides, max_size=max_size, shard=parse_shard(shard), resume=resume,
        device=device, bar=output.progress, recipe=recipe)
    output.log(f"wrote CAMs of {dataset.name}/{dataset.split} to {path}")
    output.artifact(path, {"settings": dataclasses.asdict(settings)})
