"""`weaktr data check`: validate a dataset layout and name what is missing."""

from __future__ import annotations

import typer
from rich.console import Console

from weaktr_cli.commands import options
from weaktr_cli.commands.helptext import reflow
from weaktr_cli.commands.output import Output
from weaktr_cli.errors import WeakTrError

app = typer.Typer(help="Dataset tools.", no_args_is_help=True, rich_markup_mode="rich")

CHECK_HELP = """Validate a dataset layout and list what is missing or broken.

For [bold]shapes[/] this also generates the built-in dataset into the cache if needed.

[dim]Examples:[/]
  weaktr data check --data voc --data-root ~/data/VOCdevkit
  weaktr data check --data coco --data-root ~/data/coco
  weaktr data check --data shapes
"""


@app.command("check", help=reflow(CHECK_HELP))
def check(
    data: options.Data = "shapes",
    data_root: options.DataRoot = None,
    json_mode: options.Json = False,
    quiet: options.Quiet = False,
) -> None:
    from weaktr_cli.data import check_dataset

    output = Output(json_mode=json_mode, quiet=quiet)
    problems = check_dataset(data, data_root)
    payload = {"data": data, "data_root": str(data_root) if data_root else None,
               "ok": not problems, "problems": problems}

    def render(console: Console) -> None:
        if not problems:
            console.print(f"[green]ok[/]: {data} layout is complete")
        for line in problems:
            console.print(f"[red]problem[/]: {line}")

    output.result(payload, render)
    if problems:
        raise WeakTrError(f"{data} layout has {len(problems)} problem(s)", hint=problems[0])
