"""Option aliases shared by every command, so a flag means the same thing everywhere."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from weaktr_cli.commands.output import Output
from weaktr_cli.names import DatasetName

if TYPE_CHECKING:
    from weaktr_cli.phases import ReferenceModel

__all__ = ["DatasetName"]

Data = Annotated[
    DatasetName,
    typer.Option(
        "--data",
        help="Dataset: shapes (built-in, synthetic), voc or coco.",
        rich_help_panel="Data",
    ),
]
DataOptional = Annotated[
    DatasetName | None,
    typer.Option(
        "--data",
        help="Dataset: shapes, voc or coco (default: the one the artifact was made from).",
        rich_help_panel="Data",
    ),
]
DataRoot = Annotated[
    Path | None,
    typer.Option(
        "--data-root",
        help="Dataset folder (VOCdevkit/VOC2012 or COCO root) (default: $WEAKTR_DATA_ROOT). "
        "For shapes: a generated shapes folder or the cache (default: $WEAKTR_CACHE).",
        rich_help_panel="Data",
    ),
]
Split = Annotated[
    str,
    typer.Option("--split", help="Split name (train, val, train_aug) or a list file.",
                 rich_help_panel="Data"),
]
SplitOptional = Annotated[
    str | None,
    typer.Option(
        "--split",
        help="Split name or list file (default: the artifact's split).",
        rich_help_panel="Data",
    ),
]
Json = Annotated[
    bool,
    typer.Option("--json", help="Print the result as JSON on stdout.", rich_help_panel="Output"),
]
Quiet = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="No progress or logs on stderr.", rich_help_panel="Output"),
]


def out(help: str) -> Any:
    """`--out` / `-o`, the file a command writes (its help says which)."""
    return typer.Option("--out", "-o", help=help)


def with_output(*, training: bool = False) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command the --json and --quiet options and the `Output` they make.

    The command ends with a keyword-only `output: Output` where the two flags would stand; the
    function Typer registers declares --json and -q in its place and hands the command
    `Output(json_mode=..., quiet=...)`, or `Output.for_training(...)` for a training command
    (under torchrun only the main process talks). Typer reads the parameters from
    `inspect.signature`, hence the `__signature__` of the wrapper.
    """

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)
        own = [p for name, p in signature.parameters.items() if name != "output"]
        flags = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=False,
                                   annotation=annotation)
                 for name, annotation in (("json_mode", Json), ("quiet", Quiet))]
        make = Output.for_training if training else Output

        @functools.wraps(command)
        def run(*args: Any, json_mode: bool = False, quiet: bool = False, **kwargs: Any) -> None:
            command(*args, output=make(json_mode=json_mode, quiet=quiet), **kwargs)

        run.__signature__ = signature.replace(parameters=own + flags)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in own + flags}
        return run

    return decorate
Device = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel="Compute")
]
Workers = Annotated[
    int,
    typer.Option("--workers", min=1, help="Worker processes computing images (this process "
                 "writes the output meanwhile).",
                 rich_help_panel="Compute"),
]
#: DataLoader workers of the training commands: another count than --workers (0 is allowed:
#: load in the training process); --workers is accepted as its former name.
LoaderWorkers = Annotated[
    int | None,
    typer.Option("--loader-workers", "--workers", min=0,
                 help="Data loader worker processes (0: load in the training process; default: "
                 "the recipe's). --workers is its former name.", rich_help_panel="Compute"),
]
Precision = Annotated[str | None, typer.Option(help="auto, fp32, bf16 or fp16.")]
#: The training commands' --resume (the writers' --resume continues OUT.partial instead).
ResumeRun = Annotated[bool, typer.Option(
    help="Continue an interrupted run of --out from OUT.last and OUT.state.")]
#: The per-image writers' --resume (dump-cams, crf, predict).
ResumePartial = Annotated[bool, typer.Option(help="Continue OUT.partial if present.")]
RecipeSeed = Annotated[int | None, typer.Option(help="Random seed (default: the recipe's).")]
#: A released reference segmentation checkpoint (predict, evaluate, export-onnx).
ReferenceCheckpoint = Annotated[Path | None, typer.Option(
    help="A released hustvl/WeakTr segmentation checkpoint (checkpoint.pth), loaded strictly "
         "and run with the reference's test-time procedure.", rich_help_panel="Model")]
ReferenceNormalization = Annotated[str | None, typer.Option(
    help="Its input normalisation: deit (DeiT-S) or vit (ViT-S); default the variant.yml "
         "beside it.", rich_help_panel="Model")]
ReferenceHeads = Annotated[int | None, typer.Option(
    min=1, help="Its attention heads (default: width // 64, as the reference).",
    rich_help_panel="Model")]


def reference_model(checkpoint: Path | None, normalization: str | None, heads: int | None
                    ) -> ReferenceModel | None:
    """The --reference-* options as one value for the library (None without a checkpoint)."""
    from weaktr_cli.phases import ReferenceModel

    return None if checkpoint is None else ReferenceModel(checkpoint, normalization, heads)


Shard = Annotated[
    str | None,
    typer.Option(
        "--shard",
        help="Process only shard K of N (K/N, 1-based); merge shards with `weaktr merge`.",
        rich_help_panel="Compute",
    ),
]

def _recipe_help() -> str:
    from weaktr_cli.recipes import recipe_help

    return recipe_help()


Recipe = Annotated[str | None, typer.Option(help=_recipe_help())]
FromScratch = Annotated[
    bool,
    typer.Option(
        "--from-scratch",
        help="Train from random weights with a recipe made for ImageNet weights (voc, coco), "
        "which otherwise refuses to start without --pretrained.",
    ),
]
