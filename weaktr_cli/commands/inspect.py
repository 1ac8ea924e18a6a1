"""`weaktr inspect`: what an artifact, checkpoint or ONNX model holds and how it was made."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from weaktr_cli.commands import options
from weaktr_cli.commands.output import Output

HELP = """Show what a weaktr file holds and how it was made.

An HDF5 artifact (cams, seeds, predictions): kind, image count, dataset and its folder, classes,
provenance and sizes. A checkpoint (cam.ckpt, seg.ckpt, or the .last copy training keeps
beside it): model kind and architecture, parameter count, classes, the data and settings it
was trained with, its result, and the resume files beside it. A .state file: what --resume
restores. An exported ONNX model: kind, classes, input sizes, normalisation, source checkpoint.
A released hustvl/WeakTr segmentation checkpoint (checkpoint.pth): the model read from its
tensors and how to run it with --reference-checkpoint.

[dim]Examples:[/]
  weaktr inspect cams.h5
  weaktr inspect seeds.h5 --json | jq .parents
  weaktr inspect seg.ckpt
  weaktr inspect model.onnx --json | jq .class_names
"""


def inspect(
    artifact: Annotated[Path, typer.Argument(
        help="A weaktr HDF5 artifact, checkpoint (.ckpt, .last, .state) or ONNX model.")],
    *,
    output: Annotated[Output, options.OUTPUT],
) -> None:
    from weaktr_cli.describe import describe

    payload = describe(artifact)
    output.result(payload, lambda console: render(console, payload))


def render(console: Console, p: dict[str, Any]) -> None:
    table = Table(title=escape(p["path"]), show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = {"artifact": _artifact_rows, "checkpoint": _checkpoint_rows,
            "training-state": _state_rows, "onnx": _onnx_rows,
            "reference-checkpoint": _reference_rows}[p["format"]](p)
    for key, value in rows:
        table.add_row(key, escape(value))
    console.print(table)


def _classes(p: dict[str, Any]) -> str:
    return f"{p['num_classes']}: {', '.join(n for n in p['class_names'] if n)}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _seed(seed: int | None) -> str:
    # Artifacts store -1 for "no seed"; say so instead of printing None or -1.
    return "no seed recorded" if seed is None or seed == -1 else f"seed {seed}"


def _artifact_rows(p: dict[str, Any]) -> list[tuple[str, str]]:
    per_image = p["file_bytes"] / max(p["images"], 1)
    rows = [
        ("kind", f"{p['kind']} artifact (schema {p['schema_version']})"),
        ("images", str(p["images"])),
        ("dataset", f"{p['dataset']} / {p['split']}"),
    ]
    if p.get("data_root"):
        rows.append(("data root", p["data_root"]))
    rows += [
        ("classes", _classes(p)),
        ("size", f"{_mb(p['file_bytes'])} ({per_image / 1e3:.1f} kB per image)"),
        ("command", p["command"]),
        ("made by", f"weaktr {p['weaktr_version']} at {p['created']}, {_seed(p['seed'])}"),
        ("config", ", ".join(f"{k}={v}" for k, v in sorted(p["config"].items()))),
    ]
    rows += [("parent", f"{q['path']} (sha256 {q['sha256'][:12]})") for q in p["parents"]]
    return rows


def _checkpoint_rows(p: dict[str, Any]) -> list[tuple[str, str]]:
    what = {"cam": "CAM model (train-cam)", "segmenter": "segmentation model (retrain)"}
    encoder = p.get("encoder") or {}
    shape = ", ".join(f"{k} {encoder[k]}" for k in ("patch_size", "embed_dim", "depth")
                      if k in encoder)
    rows = [
        ("kind", f"{what.get(p['kind'], p['kind'])} checkpoint (format {p['format_version']})"),
        ("model", f"{p['arch']}" + (f" ({shape})" if shape else "")),
        ("parameters", f"{p['parameters'] / 1e6:.2f} M in {p['tensors']} tensors, "
                       f"{_mb(p['file_bytes'])}"),
        ("classes", _classes(p)),
        ("trained on", f"{p['dataset']} / {p['train_split']}"
                       + (f" with the {p['recipe']} recipe" if p.get("recipe") else "")),
        ("encoder init", p["pretrained"] or "none: trained from scratch"),
    ]
    train = p["train"]
    settings = [f"{k} {train[k]}" for k in ("epochs", "iterations", "batch_size", "input_size",
                                           "crop_size", "base_lr", "lr", "optimizer")
                if train.get(k) is not None]
    rows.append(("settings", ", ".join(settings) + f", precision {p['precision']}, "
                 + _seed(p["seed"])))
    result = ", ".join(f"{k} {_num(v)}" for k, v in p["result"].items() if v is not None)
    rows.append(("result", result or "-"))
    if p.get("seeds"):
        rows.append(("seeds", f"{p['seeds']['path']} (sha256 {p['seeds']['sha256'][:12]})"))
    rows.append(("made by", f"weaktr {p['weaktr_version']}, torch {p['torch_version']}"))
    for suffix, path in p["companions"].items():
        what_for = {".last": "the last epoch/step (when another one was kept)",
                    ".state": "optimizer and step for --resume",
                    ".jsonl": "the training log"}[suffix]
        rows.append(("beside it", f"{path}: {what_for}"))
    return rows


def _reference_rows(p: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("kind", p["kind"]),
        ("model", p["model"]),
        ("dataset", p["dataset"] or f"unknown ({p['n_cls']} classes): pass --data"),
        ("normalisation", p["normalization"]),
        ("size", _mb(p["file_bytes"])),
        ("run it", "weaktr predict / evaluate / export-onnx --reference-checkpoint FILE"),
    ]


def _state_rows(p: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("kind", "training state for --resume (optimizer, scheduler, step, RNG)"),
            ("holds", ", ".join(p["keys"])), ("size", _mb(p["file_bytes"]))]
    if p.get("step") is not None:
        rows.append(("step", str(p["step"])))
    if p.get("checkpoint"):
        rows.append(("checkpoint", f"{p['checkpoint']} (resume with the same --out)"))
    return rows


def _onnx_rows(p: dict[str, Any]) -> list[tuple[str, str]]:
    size = "dynamic" if p["dynamic"] else "x".join(str(v) for v in p["input_size"])
    rows = [
        ("kind", f"{p['kind']} ONNX model" + (f" ({p['cam_variant']} CAM)"
                                              if p.get("cam_variant") else "")),
        ("model", str(p.get("arch") or "-")),
        ("classes", _classes(p)),
        ("trained on", str(p.get("dataset") or "-")
                       + (f" with the {p['recipe']} recipe" if p.get("recipe") else "")),
        ("input", f"{size} (min {p['min_size'][0]}x{p['min_size'][1]}), batch "
                  f"{p['batch_size']}, crop {p['crop_size']}, patch {p['patch_size']}"),
        ("normalisation", f"mean {p['mean']}, std {p['std']} (inside the graph)"),
        ("size", _mb(p["file_bytes"])),
    ]
    if p.get("checkpoint"):
        rows.append(("exported from", f"{p['checkpoint']} (sha256 "
                                      f"{(p.get('checkpoint_sha256') or '')[:12]})"))
    rows.append(("made by", f"weaktr {p['weaktr_version']}"))
    return rows


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
