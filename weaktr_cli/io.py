"""Small file helpers: every file weaktr writes appears whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def give_default_permissions(path: str | Path) -> None:
    """chmod to what a plain `open()` would create (0o666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def temp_path_beside(path: Path) -> Path:
    """A fresh temp file next to `path` (same file system, so a rename is atomic), with the
    permissions a plain `open()` would give (mkstemp's are owner-only)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    give_default_permissions(tmp)
    return Path(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to a temp file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    tmp = temp_path_beside(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
