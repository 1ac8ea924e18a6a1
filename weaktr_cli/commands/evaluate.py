"""`weaktr evaluate`: mIoU of a CAM, seed or prediction artifact against ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from weaktr_cli.commands import options
from weaktr_cli.commands.output import Output
from weaktr_cli.phases import ReferenceModel

HELP = """Score an artifact against the dataset's pixel ground truth.

A [bold]labels[/] artifact (seeds, predictions) gets per-class IoU, precision, recall, mIoU and
pixel accuracy; a [bold]cams[/] artifact gets a background-threshold sweep and the table of the
best threshold. The dataset and split default to those the artifact was made from.

[dim]Examples:[/]
  weaktr evaluate cams.h5
  weaktr evaluate seeds.h5 --data voc --data-root ~/VOCdevkit --split train
  weaktr evaluate preds.h5 --json --out metrics.json
  weaktr evaluate --checkpoint seg.ckpt --split val --multiscale
  weaktr evaluate --reference-checkpoint checkpoint.pth --data voc --split val --multiscale
"""


def evaluate(
    artifact: Annotated[Path | None, typer.Argument(help="A cams or labels HDF5 artifact.")
                        ] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        help="Predict with this segmenter checkpoint first, then score the predictions.",
        rich_help_panel="Model")] = None,
    reference: Annotated[ReferenceModel | None, options.REFERENCE] = None,
    multiscale: Annotated[bool, typer.Option(help="With --checkpoint: multi-scale + flip.",
                                             rich_help_panel="Model")] = False,
    fuse_layers: Annotated[bool, typer.Option(help="With --checkpoint: 0.8 P1 + P2.",
                                              rich_help_panel="Model")] = False,
    crf: Annotated[str | None, typer.Option(help="With --checkpoint: test-time CRF preset or "
                                                 "none (default: the dataset's recipe).",
                                            rich_help_panel="Model")] = None,
    predictions: Annotated[Path | None, typer.Option(
        help="With --checkpoint: keep the predictions artifact here.",
        rich_help_panel="Model")] = None,
    device: options.Device = "auto",
    data: options.DataOptional = None,
    data_root: options.DataRoot = None,
    split: options.SplitOptional = None,
    thresholds: Annotated[
        str,
        typer.Option(help="Background thresholds for CAMs: start:stop:step or a comma list."),
    ] = "0.30:0.60:0.01",
    search_start: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Where the reference's early-stopping threshold search starts, "
        "reported beside the sweep's best: 0.40 (0ff9d9a), 0.30 (3547b87).")] = 0.40,
    out: Annotated[
        Path | None, typer.Option("--out", help="Also write the metrics JSON here.")
    ] = None,
    *,
    output: Annotated[Output, options.OUTPUT],
) -> None:
    from weaktr_cli.phases import evaluate_run

    payload = evaluate_run(
        artifact=artifact, checkpoint=checkpoint, reference=reference,
        data=None if data is None else str(data), data_root=data_root, split=split,
        thresholds=thresholds, multiscale=multiscale, fuse_layers=fuse_layers, crf=crf,
        predictions=predictions, device=device, out=out, bar=output.progress,
        search_start=search_start)
    output.result(payload, lambda console: render(console, payload))


def render(console: Console, payload: dict) -> None:
    source = payload["artifact"] or f"predictions of {payload.get('checkpoint') or 'the model'}"
    title = f"{source}: {payload['kind']} on {payload['dataset']}/{payload['split']}"
    if payload.get("best_threshold") is not None:
        title += f" (best background threshold {payload['best_threshold']:.2f})"
    table = Table(title=title)
    for column in ("class", "IoU", "precision", "recall"):
        table.add_column(column, justify="left" if column == "class" else "right")

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    for row in payload["per_class"]:
        table.add_row(row["name"], fmt(row["iou"]), fmt(row["precision"]), fmt(row["recall"]))
    table.add_section()
    table.add_row("[bold]mIoU[/]", f"[bold]{fmt(payload['miou'])}[/]", "", "")
    table.add_row("pixel accuracy", fmt(payload["pixel_accuracy"]), "", "")
    console.print(table)
    reference = payload.get("reference_search")
    if reference is not None:
        console.print(f"the reference's search (upward from {payload['search_start']:.2f}, "
                      "first non-improving stop): "
                      f"{reference['miou']:.1f} mIoU at {reference['threshold']:.2f}")
    console.print(f"images: {payload['num_images']}")
