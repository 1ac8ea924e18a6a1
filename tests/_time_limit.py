"""A wall-clock limit for fuzz examples: a reader that hangs on a damaged file fails the test
instead of stalling the suite."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise AssertionError when the body runs longer than `seconds` (SIGALRM, main thread)."""
    def hung(*_: object) -> None:
        raise AssertionError(f"a reader ran for more than {seconds} s on a damaged file")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
