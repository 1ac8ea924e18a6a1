"""The `weaktr` Typer app: registers every subcommand and holds the one error boundary.

`app` (every command) is built on first use. `main()` builds an app of the one subcommand
named on the command line when there is one: a command module imports its own options only,
and Typer turns one signature into click parameters instead of every command's (together a
fifth of a second of each `weaktr crf` call on a small CPU). `weaktr`, `weaktr --help` and
anything else get the whole app.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import typer

from weaktr_cli import __version__
from weaktr_cli.commands.option_groups import add_command
from weaktr_cli.errors import WeakTrError

#: Subcommand name -> its module in weaktr_cli.commands (the function has the module's name).
COMMANDS = {
    "train-cam": "train_cam",
    "dump-cams": "dump_cams",
    "crf": "crf",
    "retrain": "retrain",
    "predict": "predict",
    "evaluate": "evaluate",
    "export-onnx": "export_onnx",
    "inspect": "inspect",
    "merge": "merge",
    "show": "show",
    "pipeline": "pipeline",
}
#: Subcommand groups (a Typer app of their own) -> their module.
GROUPS = {"data": "data"}


def _version(value: bool) -> None:
    if value:
        print(f"weaktr {__version__}")
        raise typer.Exit()


def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """WeakTr weakly-supervised semantic segmentation toolkit."""


def build_app(only: str | None = None) -> typer.Typer:
    """The Typer app with every subcommand, or with the one called `only`."""
    built = typer.Typer(
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
    built.callback()(_root)
    for name, module_name in COMMANDS.items():
        if only in (None, name):
            module = importlib.import_module(f"weaktr_cli.commands.{module_name}")
            add_command(built, name, module.HELP, getattr(module, module_name))
    for name, module_name in GROUPS.items():
        if only in (None, name):
            module = importlib.import_module(f"weaktr_cli.commands.{module_name}")
            built.add_typer(module.app, name=name)
    return built


def __getattr__(name: str) -> Any:
    """`app`: the whole CLI, built when first asked for (tests, shell completion)."""
    if name == "app":
        globals()["app"] = built = build_app()
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _app_for(argv: list[str]) -> typer.Typer:
    """The app to parse `argv` (without the program name) with."""
    name = argv[0] if argv else None
    return build_app(name) if name in COMMANDS or name in GROUPS else build_app()


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
        code = _app_for(sys.argv[1:])(standalone_mode=False, prog_name="weaktr")
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
