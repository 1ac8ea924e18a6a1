"""`weaktr inspect`: what an artifact holds and how it was made."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from weaktr_cli.commands import options
from weaktr_cli.commands.output import Output

HELP = """Show an artifact's kind, image count, classes, provenance and sizes.

[dim]Examples:[/]
  weaktr inspect cams.h5
  weaktr inspect seeds.h5 --json | jq .parents
"""


def inspect(
    artifact: Annotated[Path, typer.Argument(help="A weaktr HDF5 artifact.")],
    json_mode: options.Json = False,
    quiet: options.Quiet = False,
) -> None:
    from weaktr_cli.artifacts import open_artifact

    output = Output(json_mode=json_mode, quiet=quiet)
    with open_artifact(artifact) as reader:
        meta = reader.meta
        payload = {
            "path": str(artifact),
            "kind": meta.kind,
            "schema_version": meta.schema_version,
            "images": len(reader),
            "dataset": meta.dataset,
            "split": meta.split,
            "num_classes": meta.num_classes,
            "class_names": list(meta.class_names),
            "file_bytes": artifact.stat().st_size,
            "data_bytes": reader.stored_bytes(),
            "command": meta.command,
            "weaktr_version": meta.weaktr_version,
            "seed": meta.seed,
            "created": meta.created,
            "config": meta.config,
            "parents": meta.parents,
        }
    output.result(payload, lambda console: render(console, payload))


def render(console: Console, p: dict) -> None:
    table = Table(title=p["path"], show_header=False)
    table.add_column(style="bold")
    table.add_column()
    per_image = p["file_bytes"] / max(p["images"], 1)
    rows = [
        ("kind", f"{p['kind']} (schema {p['schema_version']})"),
        ("images", str(p["images"])),
        ("dataset", f"{p['dataset']} / {p['split']}"),
        ("classes", f"{p['num_classes']}: {', '.join(n for n in p['class_names'] if n)}"),
        ("size", f"{p['file_bytes'] / 1e6:.2f} MB ({per_image / 1e3:.1f} kB per image)"),
        ("command", p["command"]),
        ("made by", f"weaktr {p['weaktr_version']} at {p['created']}, seed {p['seed']}"),
    ]
    rows += [("config", ", ".join(f"{k}={v}" for k, v in sorted(p["config"].items())))]
    rows += [("parent", f"{q['path']} (sha256 {q['sha256'][:12]})") for q in p["parents"]]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
