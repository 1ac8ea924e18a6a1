"""The `weaktr` Typer app: registers every subcommand and holds the one error boundary."""

from __future__ import annotations

import os
import sys

import typer

from weaktr_cli import __version__
from weaktr_cli.commands import (
    crf,
    data,
    dump_cams,
    evaluate,
    export_onnx,
    inspect,
    merge,
    pipeline,
    predict,
    retrain,
    show,
    train_cam,
)
from weaktr_cli.commands.helptext import reflow
from weaktr_cli.errors import WeakTrError

app = typer.Typer(
    name="weaktr",
    help="WeakTr weakly-supervised semantic segmentation: image-level labels in, "
    "a segmentation model out.\n\n"
    "Phases exchange HDF5 artifacts: train-cam -> dump-cams -> crf -> retrain -> predict "
    "-> evaluate (export-onnx for deployment); pipeline runs them all.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
    suggest_commands=False,  # click already says "Did you mean ...?"; Typer would repeat it
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"weaktr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """WeakTr weakly-supervised semantic segmentation toolkit."""


app.command("train-cam", help=reflow(train_cam.HELP))(train_cam.train_cam)
app.command("dump-cams", help=reflow(dump_cams.HELP))(dump_cams.dump_cams)
app.command("crf", help=reflow(crf.HELP))(crf.crf)
app.command("retrain", help=reflow(retrain.HELP))(retrain.retrain)
app.command("predict", help=reflow(predict.HELP))(predict.predict)
app.command("evaluate", help=reflow(evaluate.HELP))(evaluate.evaluate)
app.command("export-onnx", help=reflow(export_onnx.HELP))(export_onnx.export_onnx)
app.command("inspect", help=reflow(inspect.HELP))(inspect.inspect)
app.command("merge", help=reflow(merge.HELP))(merge.merge)
app.command("show", help=reflow(show.HELP))(show.show)
app.command("pipeline", help=reflow(pipeline.HELP))(pipeline.pipeline)
app.add_typer(data.app, name="data")


def _fail(message: str, hint: str | None = None, code: int = 1) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(f"[bold red]error:[/] {escape(message)}")
    if hint:
        console.print(f"[dim]hint: {escape(hint)}[/]")
    sys.exit(code)


def main() -> None:
    """Console-script entry: run the app; turn known failures into one line and an exit code."""
    import click

    debug = os.environ.get("WEAKTR_DEBUG") == "1"
    try:
        code = app(standalone_mode=False, prog_name="weaktr")
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:  # usage errors: exit 2 with click's message
        exc.show()
        code = exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        code = INTERRUPTED
    except WeakTrError as exc:
        if debug:
            raise
        _fail(*_one_line(exc.message, exc.hint))
        return
    except Exception as exc:
        if debug:
            raise
        _fail(*_unexpected(exc))
        return
    if code == INTERRUPTED:
        # Typer turns Ctrl-C into Exit(130) before it reaches us; say what it means.
        _fail("interrupted", "rerun the same command to resume where it stopped", code=INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)


#: Exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


def _one_line(message: str, hint: str | None) -> tuple[str, str | None]:
    """An error raised in a DataLoader worker arrives as torch's multi-line report ("Caught
    WeakTrError in DataLoader worker process 0. Original Traceback ..."); keep its last line,
    which is the original error."""
    if "Original Traceback" not in message:
        return message, hint
    last = message.rstrip().splitlines()[-1]
    _, _, text = last.partition(": ")  # "weaktr_cli.errors.WeakTrError: <message (hint: ..)>"
    text = text or last
    if text.endswith(")") and " (hint: " in text:
        text, _, worker_hint = text[:-1].rpartition(" (hint: ")
        return text, hint or worker_hint
    return text, hint


def _unexpected(exc: Exception) -> tuple[str, str]:
    """A bug or an unforeseen failure: its type and one line, and how to see the traceback."""
    message, _ = _one_line(str(exc), None)
    first = message.strip().splitlines()[0] if message.strip() else ""
    return (f"unexpected {type(exc).__name__}: {first}",
            "rerun with WEAKTR_DEBUG=1 for the traceback")
