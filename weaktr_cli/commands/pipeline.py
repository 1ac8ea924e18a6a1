"""`weaktr pipeline`: the whole method on one dataset, make-style."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from weaktr_cli.commands import options
from weaktr_cli.commands.output import Output

HELP = """Run the whole method on one dataset, make-style.

Every phase in order into a work folder: train-cam, dump-cams, crf, retrain,
predict (train and val), evaluate, and a report (panels.png, iou.png). Ends with one table:
mIoU of the CAMs (best background threshold), the seeds and the retrained model, with the wall
time and artifact size of each phase.

Like make, a phase whose artifact exists and whose inputs and settings are unchanged is
skipped; --force PHASE redoes it and everything after it. Every phase is also an ordinary
subcommand: stop after any phase, inspect or replace its HDF5 file, and rerun.

[dim]Examples:[/]
  weaktr pipeline                                  # built-in shapes dataset, CPU recipe
  weaktr pipeline --work runs/shapes --force retrain
  weaktr pipeline --data voc --data-root ~/VOCdevkit --pretrained deit_small.pth --work runs/voc
"""


def pipeline(
    work: Annotated[Path, typer.Option("--work", "-w", help="Work folder.")] = Path(
        "weaktr-run"),
    data: options.Data = options.DatasetName.shapes,
    data_root: options.DataRoot = None,
    train_split: Annotated[str, typer.Option(help="Split to train on.")] = "train",
    val_split: Annotated[str, typer.Option(help="Split to validate on.")] = "val",
    recipe: Annotated[str | None, typer.Option(
        help="Settings of every phase (default: the dataset's).")] = None,
    pretrained: Annotated[Path | None, typer.Option(
        help="Local ImageNet ViT weights for both models.")] = None,
    force: Annotated[list[str] | None, typer.Option(
        help="Redo this phase and all after it (repeatable).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (default: the recipe's).")] = None,
    workers: options.Workers = 2,
    device: options.Device = "auto",
    json_mode: options.Json = False,
    quiet: options.Quiet = False,
) -> None:
    from weaktr_cli.pipeline import PipelineConfig, run_pipeline

    output = Output(json_mode=json_mode, quiet=quiet)
    config = PipelineConfig(work=work, data=str(data), data_root=data_root,
                            train_split=train_split, val_split=val_split, recipe=recipe,
                            seed=seed, pretrained=pretrained, device=device, workers=workers,
                            force=tuple(force or ()))
    bars = []

    def progress(name: str):
        context = output.progress(name)
        update = context.__enter__()
        bars.append(context)
        return update

    try:
        result = run_pipeline(config, log=output.log, progress=progress)
    finally:
        for context in reversed(bars):
            context.__exit__(None, None, None)
    payload = {
        "work": str(result.work),
        "metrics": result.metrics,
        "phases": [{"phase": r.name, "skipped": r.skipped, "wall_s": round(r.wall_s, 2),
                    "size_bytes": r.size_bytes, "outputs": [str(p) for p in r.outputs]}
                   for r in result.phases],
        "pictures": [str(result.work / "panels.png"), str(result.work / "iou.png")],
    }
    output.result(payload, lambda console: render(console, payload))


_MIOU_OF = {"dump-cams": ("cams_train", "CAMs, train *"),
            "crf": ("seeds_train", "seeds, train"),
            "retrain": ("model_train", "model, train"),
            "predict": ("model_val", "model, val")}


def render(console: Console, payload: dict) -> None:
    table = Table(title=f"weaktr pipeline: {payload['work']}",
                  caption="* at the best background threshold")
    for column in ("phase", "status", "wall s", "size", "mIoU of", "mIoU"):
        right = column in ("wall s", "size", "mIoU")
        table.add_column(column, justify="right" if right else "left")
    metrics = payload["metrics"]
    for row in payload["phases"]:
        scored, miou = "", ""
        key, label = _MIOU_OF.get(row["phase"], (None, ""))
        if key is not None and metrics.get(key) is not None:
            scored, miou = label, f"{metrics[key]:.1f}"
        table.add_row(row["phase"], "cached" if row["skipped"] else "ran", f"{row['wall_s']:.1f}",
                      _size(row["size_bytes"]), scored, miou)
    total = sum(r["wall_s"] for r in payload["phases"] if not r["skipped"])
    table.add_section()
    table.add_row("total (this run)", "", f"{total:.1f}", "", "", "")
    console.print(table)
    console.print("pictures: " + ", ".join(payload["pictures"]))


def _size(n: int) -> str:
    return "" if n == 0 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"
