"""`weaktr crf`: CAMs to pseudo-label seeds with dense CRF (phase 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from weaktr_cli.commands import options
from weaktr_cli.commands.output import Output

HELP = """Turn CAMs into pseudo-label seeds with dense CRF (phase 3).

A constant background plane --bg is put in front of the CAMs, the argmax gives a label map,
and a dense CRF (pydensecrf) refines it. CRF parameters start from a named preset (voc, coco,
or the built-in dataset's) and any of them can be overridden. Parallel over images
(--workers), resumable, shardable. Prints the artifact path.

[dim]Examples:[/]
  weaktr crf --cams cams.h5 --out seeds.h5
  weaktr crf --cams cams.h5 --data voc --data-root ~/VOCdevkit --workers 8 --out seeds.h5
  weaktr crf --cams cams.h5 --no-crf --bg 0.45 --out threshold_seeds.h5
  weaktr crf --cams cams.h5 --ignore-disagreement --out seeds.h5
"""


def crf(
    cams: Annotated[Path, typer.Option("--cams", help="A cams artifact (from dump-cams).")],
    data: options.DataOptional = None,
    data_root: options.DataRoot = None,
    out: Annotated[Path, options.out("The seeds artifact.")] = Path("seeds.h5"),
    bg: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="Background threshold (default: the dataset's recipe).")] = None,
    preset: Annotated[str | None, typer.Option(
        help="CRF parameter preset (default: the dataset's).")] = None,
    no_crf: Annotated[bool, typer.Option("--no-crf", help="Plain threshold seeds.")] = False,
    recipe: options.Recipe = None,
    unary: Annotated[str, typer.Option(
        help="hard (unary from the label map, gt_prob) or soft (from CAM probabilities).")
    ] = "hard",
    ignore_disagreement: Annotated[bool, typer.Option(
        help="Mark pixels where CRF and CAM argmax disagree as 255 (ignored).")] = False,
    gt_prob: Annotated[float | None, typer.Option(rich_help_panel="CRF parameters")] = None,
    iterations: Annotated[int | None, typer.Option(rich_help_panel="CRF parameters")] = None,
    gaussian_sxy: Annotated[float | None, typer.Option(rich_help_panel="CRF parameters")] = None,
    gaussian_compat: Annotated[float | None, typer.Option(
        rich_help_panel="CRF parameters")] = None,
    bilateral_sxy: Annotated[float | None, typer.Option(rich_help_panel="CRF parameters")] = None,
    bilateral_srgb: Annotated[float | None, typer.Option(
        rich_help_panel="CRF parameters")] = None,
    bilateral_compat: Annotated[float | None, typer.Option(
        rich_help_panel="CRF parameters")] = None,
    workers: options.Workers = 1,
    shard: options.Shard = None,
    resume: options.ResumePartial = True,
    *,
    output: Annotated[Output, options.OUTPUT],
) -> None:
    from weaktr_cli.phases import crf_run
    from weaktr_cli.shards import parse_shard

    crf_overrides: dict[str, Any] = {
        "gt_prob": gt_prob, "iterations": iterations, "gaussian_sxy": gaussian_sxy,
        "gaussian_compat": gaussian_compat, "bilateral_sxy": bilateral_sxy,
        "bilateral_srgb": bilateral_srgb, "bilateral_compat": bilateral_compat}
    path, threshold, params = crf_run(
        cams=cams, data=None if data is None else str(data), data_root=data_root, out=out,
        bg=bg, preset=preset, no_crf=no_crf, unary=unary,
        ignore_disagreement=ignore_disagreement, crf_overrides=crf_overrides, workers=workers,
        shard=parse_shard(shard), resume=resume, bar=output.progress, recipe=recipe)
    output.log(f"wrote seeds to {path}")
    output.artifact(path, {"bg": threshold, "crf": params.to_dict() if params else None})
