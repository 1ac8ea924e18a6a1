"""`weaktr merge`: join shard artifacts (`--shard K/N` runs) into one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from weaktr_cli.commands import options
from weaktr_cli.commands.output import Output

HELP = """Merge shard artifacts of the same kind, dataset, split and classes into one file.

[dim]Example:[/]
  for k in 1 2 3 4; do weaktr dump-cams --shard $k/4 --out cams.$k.h5 ... & done; wait
  weaktr merge cams.1.h5 cams.2.h5 cams.3.h5 cams.4.h5 --out cams.h5
"""


def merge(
    inputs: Annotated[list[Path], typer.Argument(help="Shard artifacts to merge.")],
    out: Annotated[Path, options.out("The merged artifact.")],
    *,
    output: Annotated[Output, options.OUTPUT],
) -> None:
    from weaktr_cli.artifact_writer import merge_artifacts
    from weaktr_cli.artifacts import open_artifact

    merged = merge_artifacts(list(inputs), out)
    with open_artifact(merged) as reader:
        count = len(reader)
    output.log(f"merged {len(inputs)} artifacts, {count} images")
    output.artifact(merged, {"images": count})
