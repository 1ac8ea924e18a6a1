"""Where a command's words go: results to stdout (rich or JSON), chatter to stderr.

Every command builds one `Output` from its `--json` / `--quiet` flags, so both flags mean the
same everywhere: `--json` prints one JSON document on stdout and nothing else there;
`--quiet` silences logs and progress bars (errors still print).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


class Output:
    """The consoles are made (and rich imported) when first used: a quiet `weaktr crf` that
    only prints its artifact path never loads rich."""

    def __init__(self, *, json_mode: bool = False, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        # --quiet silences the libraries' own notes too (timm warns through `logging`, e.g.
        # that a one-step cosine schedule is flat); errors still reach stderr.
        logging.getLogger("timm").setLevel(logging.ERROR if quiet else logging.NOTSET)

    # soft_wrap: a log line stays one line in a file or pipe (rich would hard-wrap it at 80
    # columns off a terminal); a terminal wraps it itself.
    @cached_property
    def out(self) -> Console:
        from rich.console import Console

        return Console(soft_wrap=True)

    @cached_property
    def err(self) -> Console:
        from rich.console import Console

        return Console(stderr=True, quiet=self.quiet, soft_wrap=True)

    @classmethod
    def for_training(cls, *, json_mode: bool = False, quiet: bool = False) -> Output:
        """An `Output` for a training command: under torchrun only the main process talks."""
        from weaktr_cli.runtime import dist_info_from_env

        return cls(json_mode=json_mode, quiet=quiet or not dist_info_from_env().is_main)

    def log(self, message: str) -> None:
        """A progress note on stderr (hidden by --quiet)."""
        if not self.quiet:
            self.err.print(message, highlight=False)

    def result(self, data: dict[str, Any], render: Callable[[Console], None]) -> None:
        """Print a result: JSON with --json, else whatever `render` draws on stdout."""
        if self.json_mode:
            sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        else:
            render(self.out)

    def artifact(self, path: Path, data: dict[str, Any] | None = None) -> None:
        """Announce a written artifact: its bare path on stdout, for `$(weaktr ...)` pipelines."""
        if self.json_mode:
            self.result({"path": str(path), **(data or {})}, lambda console: None)
        else:
            print(str(path))

    @contextmanager
    def progress(self, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        """A stderr progress bar with ETA; yields `update(done, total)`. Silent off a TTY."""
        if self.quiet:
            yield _ignore
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        enabled = not self.quiet and self.err.is_terminal
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.err,
            disable=not enabled,
            transient=False,
        ) as bar:
            task = bar.add_task(description, total=total)

            def update(done: int, new_total: int | None = None, **fields: Any) -> None:
                bar.update(task, completed=done, total=new_total or total, **fields)

            yield update


def _ignore(*args: Any, **fields: Any) -> None:
    """The `update` of a progress bar nobody sees."""
