"""`weaktr data check`: validate a dataset layout and name what is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from weaktr_cli.commands import options
from weaktr_cli.commands.option_groups import add_command
from weaktr_cli.commands.output import Output
from weaktr_cli.errors import WeakTrError

app = typer.Typer(help="Dataset tools.", no_args_is_help=True, rich_markup_mode="rich",
                  suggest_commands=False)

CHECK_HELP = """Validate a dataset layout and list what is missing or broken.

Prints, per split, the images, pixel masks and where the image-level labels come from.
Pixel masks are optional (they are only for scoring): a split without any is a note, not a
problem. For [bold]shapes[/] this also generates the built-in dataset into the cache if needed.

[dim]Examples:[/]
  weaktr data check --data voc --data-root ~/data/VOCdevkit
  weaktr data check --data coco --data-root ~/data/coco
  weaktr data check --data shapes
"""


def check(
    data: options.Data = options.DatasetName.shapes,
    data_root: options.DataRoot = None,
    *,
    output: Annotated[Output, options.OUTPUT],
) -> None:
    from weaktr_cli.data import survey_dataset

    report = survey_dataset(data, data_root)
    problems = report["problems"]
    payload = {"data": data, **report, "ok": not problems}

    def render(console: Console) -> None:
        console.print(f"{data} at {report['data_root']}")
        for split, counts in report["splits"].items():
            sources = ", ".join(f"{n} from {source}" for source, n in counts["labels"].items()
                                if n)
            console.print(f"  {split}: {counts['images']} images, {counts['masks']} masks; "
                          f"image-level labels: {sources or 'none'}", highlight=False)
        if not problems:
            console.print(f"[green]ok[/]: {data} layout is complete")
        for line in report["notes"]:
            console.print(f"[yellow]note[/]: {line}", highlight=False)
        for line in problems:
            console.print(f"[red]problem[/]: {line}", highlight=False)

    output.result(payload, render)
    if problems:
        raise WeakTrError(f"{data} layout has {len(problems)} problem(s)", hint=problems[0])


SHAPES_HELP = """Generate a built-in shapes dataset of your own size, classes and resolution.

Prints the dataset folder; pass it as --data-root with --data shapes. Generation is
deterministic (same settings, same pixels on any machine) and atomic.

[dim]Examples:[/]
  weaktr data shapes --num-train 200 --num-val 50 --num-test 50 --image-size 64 --out /tmp/shapes
  weaktr pipeline --data shapes --data-root "$(weaktr data shapes --num-classes 12 -q)"
"""


def shapes(
    out: Annotated[Path | None, options.out(
        "Folder to generate into (default: $WEAKTR_CACHE).")] = None,
    num_train: Annotated[int, typer.Option(min=1)] = 2000,
    num_val: Annotated[int, typer.Option(min=1)] = 500,
    num_test: Annotated[int, typer.Option(
        min=0, help="Held-out images that nothing is chosen on.")] = 500,
    image_size: Annotated[int, typer.Option(min=16)] = 96,
    num_classes: Annotated[int, typer.Option(min=1, help="Foreground classes K.")] = 6,
    max_objects: Annotated[int, typer.Option(min=1)] = 3,
    seed: Annotated[int, typer.Option()] = 0,
    *,
    output: Annotated[Output, options.OUTPUT],
) -> None:
    from weaktr_cli.data.shapes import ShapesConfig, class_names, ensure_shapes

    config = ShapesConfig(seed=seed, num_train=num_train, num_val=num_val,
                          num_test=num_test, image_size=image_size, num_classes=num_classes,
                          max_objects=max_objects)
    path = ensure_shapes(config, cache_dir=out)
    output.artifact(path, {"classes": list(class_names(config)), "config": config.to_dict()})


add_command(app, "check", CHECK_HELP, check)
add_command(app, "shapes", SHAPES_HELP, shapes)
