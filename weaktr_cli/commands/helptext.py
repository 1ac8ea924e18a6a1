"""Help texts are written wrapped in the source; the terminal should rewrap them."""

from __future__ import annotations


def reflow(text: str) -> str:
    """Join the wrapped lines of each prose paragraph; keep indented lines (examples) as is."""
    out: list[str] = []
    for line in text.strip("\n").splitlines():
        prose = line and not line.startswith(" ")
        if prose and out and out[-1] and not out[-1].startswith(" ") and not _is_heading(out[-1]):
            out[-1] = f"{out[-1]} {line}"
        else:
            out.append(line)
    return "\n".join(out)


def _is_heading(line: str) -> bool:
    return line.startswith("[dim]") and line.endswith("[/]")
