"""`weaktr show`: PNG panels of artifacts (image | CAMs | seeds | prediction | ground truth)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from weaktr_cli.commands import options
from weaktr_cli.commands.output import Output

HELP = """Draw artifacts as PNG panels.

One row per image with the image, a heatmap per CAM class,
each label artifact (seeds, predictions) and the ground truth, in the dataset palette with a
class legend. Artifacts are drawn in the order given; all must cover the chosen images.
The images are read from the folder the first artifact records (a custom dataset, or the
folder of `predict --images`); --data-root overrides it.

[dim]Examples:[/]
  weaktr show cams.h5 seeds.h5 preds.h5 --n 8 --out panels.png
  weaktr show cams.h5 --id 2007_000032 --data-root ~/VOCdevkit --out cat.png
  weaktr show photos.h5 --out photos.png       # what `predict --images photos/` wrote
"""


def show(
    artifacts: Annotated[list[Path], typer.Argument(help="cams and/or labels artifacts.")],
    image_id: Annotated[list[str] | None, typer.Option(
        "--id", help="Image id to draw (repeatable).")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Draw the first N images.")] = 8,
    out: Annotated[Path, options.out("PNG to write.")] = Path("panels.png"),
    data: options.DataOptional = None,
    data_root: options.DataRoot = None,
    *,
    output: Annotated[Output, options.OUTPUT],
) -> None:
    from weaktr_cli.visualize import show_artifacts

    path, ids = show_artifacts(artifacts, out, ids=image_id, n=n,
                               data=None if data is None else str(data), data_root=data_root)
    output.artifact(path, {"images": ids})
