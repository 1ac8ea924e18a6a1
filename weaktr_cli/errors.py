"""The one exception type users see as a clean message.

Library code raises `WeakTrError(message, hint=...)` for every problem a user can fix
(bad paths, wrong layouts, mismatched artifacts). The CLI's error boundary in
`commands/app.py` prints it as one red line plus the hint and exits 1.
"""

from __future__ import annotations


class WeakTrError(Exception):
    """A user-facing error: `message` says what is wrong, `hint` what to do about it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __reduce__(self) -> tuple[type[WeakTrError], tuple[str, str | None]]:
        # Keep the hint when the error crosses a process boundary (worker pools pickle it).
        return (type(self), (self.message, self.hint))

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


def refuse_newer(what: str, version: int, newest: int) -> None:
    """Refuse a file whose format `version` is newer than this weaktr reads (`newest`).

    `what` starts the message: "<what> 3, newer than this weaktr reads (2)".
    """
    if version > newest:
        raise WeakTrError(f"{what} {version}, newer than this weaktr reads ({newest})",
                          hint="upgrade weaktr")
