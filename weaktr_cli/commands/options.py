"""Option aliases shared by every command, so a flag means the same thing everywhere, and the
option groups (`weaktr_cli.commands.option_groups`) several commands take as one value."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from weaktr_cli.commands.option_groups import OptionGroup
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


_OUTPUT_OPTIONS = {"json_mode": (Json, False), "quiet": (Quiet, False)}
#: --json and -q, made into the command's `Output`.
OUTPUT = OptionGroup(_OUTPUT_OPTIONS, Output)
#: The same for a training command: under torchrun only the main process talks.
TRAINING_OUTPUT = OptionGroup(_OUTPUT_OPTIONS, Output.for_training)


def out(help: str) -> Any:
    """`--out` / `-o`, the file a command writes (its help says which)."""
    return typer.Option("--out", "-o", help=help)


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


def _reference_model(reference_checkpoint: Path | None, reference_normalization: str | None,
                     reference_heads: int | None) -> ReferenceModel | None:
    from weaktr_cli.phases import ReferenceModel

    if reference_checkpoint is None:
        return None
    return ReferenceModel(reference_checkpoint, reference_normalization, reference_heads)


#: The --reference-* options as one value for the library (None without a checkpoint).
REFERENCE = OptionGroup({"reference_checkpoint": (ReferenceCheckpoint, None),
                         "reference_normalization": (ReferenceNormalization, None),
                         "reference_heads": (ReferenceHeads, None)}, _reference_model)


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


@dataclass(frozen=True)
class TrainingFlags:
    """The options both training commands end with (before --json and -q)."""

    precision: str | None
    resume: bool
    log_jsonl: Path | None
    seed: int | None
    device: str
    loader_workers: int | None

    def overrides(self) -> dict[str, Any]:
        """The recipe settings they override (None: the recipe's)."""
        return {"precision": self.precision, "seed": self.seed, "workers": self.loader_workers}


def training_flags(log_record: str) -> OptionGroup:
    """The group of `TrainingFlags`; one line of the JSONL log covers a `log_record`."""
    log_jsonl = Annotated[Path | None, typer.Option(
        help=f"Per-{log_record} JSONL log (default: OUT.jsonl).")]
    return OptionGroup({"precision": (Precision, None), "resume": (ResumeRun, False),
                        "log_jsonl": (log_jsonl, None), "seed": (RecipeSeed, None),
                        "device": (Device, "auto"), "loader_workers": (LoaderWorkers, None)},
                       TrainingFlags)
