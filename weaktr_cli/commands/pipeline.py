"""`weaktr pipeline`: the whole method on one dataset, make-style."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from weaktr_cli.commands import options
from weaktr_cli.commands.output import Output

if TYPE_CHECKING:
    from weaktr_cli.pipeline import PipelineResult

HELP = """Run the whole method on one dataset, make-style.

Every phase in order into a work folder: train-cam, dump-cams, crf, retrain,
predict (train and test), evaluate, and a report (panels.png, iou.png). Ends with one table:
mIoU of the CAMs (best background threshold) and the seeds on train, the retrained model on
train and on the held-out test split (shapes' test split, which no recipe choice looked at;
val for datasets without one), with the wall time and artifact size of each phase. The same
figures, the phase times, the CPU kind and the versions go to WORK/metrics.json.

The recipe sets every phase; the --cam-* and --seg-* options and --precision override one
setting of it (a dataset of a few images needs batches no larger than itself). The voc and
coco recipes fine-tune ImageNet weights: pass --pretrained, or --from-scratch.

Like make, a phase whose artifact exists and whose inputs and settings are unchanged is
skipped; --force PHASE redoes it and everything after it. Every phase is also an ordinary
subcommand: stop after any phase, inspect or replace its HDF5 file, and rerun.

[dim]Examples:[/]
  weaktr pipeline                                  # built-in shapes dataset, CPU recipe
  weaktr pipeline --work runs/shapes --force retrain
  weaktr pipeline --data voc --data-root ~/VOCdevkit --pretrained deit_small.pth --work runs/voc
  weaktr pipeline --data voc --data-root mydata --recipe voc --pretrained deit_small.pth \\
      --cam-batch-size 4 --seg-batch-size 2 --seg-steps 200 --work runs/mydata
"""


_OVERRIDES = "Recipe overrides (default: the recipe's)"


def pipeline(
    work: Annotated[Path, typer.Option("--work", "-w", help="Work folder.")] = Path("weaktr-run"),
    data: options.Data = options.DatasetName.shapes,
    data_root: options.DataRoot = None,
    train_split: Annotated[str, typer.Option(help="Split to train on.")] = "train",
    val_split: Annotated[str, typer.Option(help="Split to validate on.")] = "val",
    test_split: Annotated[str | None, typer.Option(
        help="Held-out split to score the model on (default: test for shapes, else val).")
    ] = None,
    recipe: options.Recipe = None,
    pretrained: Annotated[Path | None, typer.Option(
        help="Local ImageNet ViT weights for both models.")] = None,
    from_scratch: options.FromScratch = False,
    cam_arch: Annotated[str | None, typer.Option(
        help="CAM backbone (deit-small, tiny-p8, ...).", rich_help_panel=_OVERRIDES)] = None,
    cam_batch_size: Annotated[int | None, typer.Option(
        min=1, help="CAM training batch size.", rich_help_panel=_OVERRIDES)] = None,
    cam_epochs: Annotated[int | None, typer.Option(
        min=1, help="CAM training epochs.", rich_help_panel=_OVERRIDES)] = None,
    cam_input_size: Annotated[int | None, typer.Option(
        min=8, help="CAM training crop size in pixels.", rich_help_panel=_OVERRIDES)] = None,
    seg_arch: Annotated[str | None, typer.Option(
        help="Retraining encoder (vit-small, tiny-c8, ...).", rich_help_panel=_OVERRIDES)
    ] = None,
    seg_batch_size: Annotated[int | None, typer.Option(
        min=1, help="Retraining batch size.", rich_help_panel=_OVERRIDES)] = None,
    seg_steps: Annotated[int | None, typer.Option(
        min=1, help="Retraining optimizer steps.", rich_help_panel=_OVERRIDES)] = None,
    seg_crop_size: Annotated[int | None, typer.Option(
        min=8, help="Retraining crop (and prediction window) in pixels.",
        rich_help_panel=_OVERRIDES)] = None,
    precision: Annotated[str | None, typer.Option(
        help="auto, fp32, bf16 or fp16 for training and prediction.",
        rich_help_panel=_OVERRIDES)] = None,
    predict_size: Annotated[int | None, typer.Option(
        min=8, help="Prediction: images resized to this short side (the paper's: 520).",
        rich_help_panel=_OVERRIDES)] = None,
    force: Annotated[list[str] | None, typer.Option(
        help="Redo this phase and all after it (repeatable).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (default: the recipe's).")] = None,
    workers: options.Workers = 2,
    device: options.Device = "auto",
    *,
    output: Annotated[Output, options.OUTPUT],
) -> None:
    from weaktr_cli.pipeline import PipelineConfig, phase_overrides, run_pipeline

    config = PipelineConfig(
        work=work, data=str(data), data_root=data_root, train_split=train_split,
        val_split=val_split, test_split=test_split, recipe=recipe, seed=seed,
        pretrained=pretrained, from_scratch=from_scratch, device=device, workers=workers,
        force=tuple(force or ()),
        overrides=phase_overrides(
            cam_arch=cam_arch, cam_batch_size=cam_batch_size, cam_epochs=cam_epochs,
            cam_input_size=cam_input_size, seg_arch=seg_arch, seg_batch_size=seg_batch_size,
            seg_steps=seg_steps, seg_crop_size=seg_crop_size, precision=precision,
            predict_size=predict_size))
    payload = _payload(run_pipeline(config, log=output.log, bar=output.progress))
    output.result(payload, lambda console: render(console, payload))


def _payload(result: PipelineResult) -> dict[str, Any]:
    return {
        "work": str(result.work),
        "metrics": result.metrics,
        "phases": [{"phase": r.name, "skipped": r.skipped, "wall_s": round(r.wall_s, 2),
                    "size_bytes": r.size_bytes, "outputs": [str(p) for p in r.outputs]}
                   for r in result.phases],
        "pictures": [str(p) for p in result.pictures],
        "unscored": result.unscored,
        "record": str(result.work / "metrics.json"),
    }


_MIOU_OF = {"dump-cams": ("cams_train", "CAMs, train *"),
            "crf": ("seeds_train", "seeds, train (threshold seeds)"),
            "retrain": ("model_train", "model, train")}


def _scored(phase: str, metrics: dict) -> tuple[str, str]:
    """The (label, mIoU) a phase's row shows; predict shows the held-out split's score."""
    if phase == "predict":
        held_out = [k for k in metrics if k.startswith("model_") and k != "model_train"]
        if not held_out or metrics[held_out[0]] is None:
            return "", ""
        return f"model, {held_out[0][len('model_'):]}", f"{metrics[held_out[0]]:.1f}"
    key, label = _MIOU_OF.get(phase, (None, ""))
    if key is None or metrics.get(key) is None:
        return "", ""
    miou = f"{metrics[key]:.1f}"
    if key == "seeds_train" and metrics.get("threshold_seeds_train") is not None:
        miou += f" ({metrics['threshold_seeds_train']:.1f})"
    return label, miou


def render(console: Console, payload: dict) -> None:
    table = Table(title=f"weaktr pipeline: {payload['work']}",
                  caption="* at the best background threshold; "
                          "threshold seeds: the CAMs at the seeds' background level")
    for column in ("phase", "status", "wall s", "size", "mIoU of", "mIoU"):
        right = column in ("wall s", "size", "mIoU")
        table.add_column(column, justify="right" if right else "left")
    metrics = payload["metrics"]
    for row in payload["phases"]:
        scored, miou = _scored(row["phase"], metrics)
        table.add_row(row["phase"], "cached" if row["skipped"] else "ran", f"{row['wall_s']:.1f}",
                      _size(row["size_bytes"]), scored, miou)
    total = sum(r["wall_s"] for r in payload["phases"] if not r["skipped"])
    table.add_section()
    table.add_row("total (this run)", "", f"{total:.1f}", "", "", "")
    console.print(table)
    if payload["unscored"]:
        console.print(f"not scored: no pixel labels in {' and '.join(payload['unscored'])} "
                      "(masks are optional; add SegmentationClass/<id>.png to score)")
    console.print("pictures: " + ", ".join(payload["pictures"]))
    console.print(f"record: {payload['record']}")


def _size(n: int) -> str:
    return "" if n == 0 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"
