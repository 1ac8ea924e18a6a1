"""Run the real `weaktr` entry point (error boundary included) in-process."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from weaktr_cli.commands.app import main


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    capsys.readouterr()
    argv = sys.argv
    sys.argv = ["weaktr", *[str(a) for a in args]]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)
