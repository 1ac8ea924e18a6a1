"""File helpers: every file weaktr writes appears whole or not at all, one writer at a time.

- `atomic_file` / `atomic_write_bytes`: write to a temp file beside the target, fsync, rename
  over the target, fsync the folder (the one temp + fsync + rename in the code base).
- `check_output_path`: an output that cannot be written is reported before any work starts.
- `output_lock`: an exclusive `<out>.lock` held while a run writes `<out>`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from weaktr_cli.errors import WeakTrError

LOCK_SUFFIX = ".lock"

#: Descriptors of the locks this process holds. A forked child (a crf worker) gets copies
#: that would keep the lock after this process is killed, until the child exits: it closes
#: them at once, and only this process holds the lock.
_HELD_LOCKS: set[int] = set()


def _close_held_locks() -> None:
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_held_locks)


def give_default_permissions(path: str | Path) -> None:
    """chmod to what a plain `open()` would create (0o666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def temp_path_beside(path: Path) -> Path:
    """A fresh temp file next to `path` (same file system, so a rename is atomic), with the
    permissions a plain `open()` would give (mkstemp's are owner-only)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                   dir=path.parent or ".")
    except OSError as exc:
        raise write_error(path, exc) from exc
    os.close(fd)
    give_default_permissions(tmp)
    return Path(tmp)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by path (a folder: so a rename in it survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, path: Path) -> Path:
    """fsync `tmp`, rename it over `path`, fsync the folder: `path` is old or new, never half."""
    fsync_path(tmp)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # some file systems cannot fsync a folder
        fsync_path(path.parent if str(path.parent) else Path("."))
    return path


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; write it, and on success it replaces `path` atomically.

    On an error the temp file is removed and `path` is untouched. A full disk or a file-size
    limit becomes a `WeakTrError`.
    """
    path = Path(path)
    tmp = temp_path_beside(path)
    try:
        yield tmp
        give_default_permissions(tmp)  # writers that recreate the file make it owner-only
        publish(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to a temp file beside `path`, fsync, then rename over `path`."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_error(path: Path, exc: OSError) -> WeakTrError:
    """One clear line for an OSError met while writing `path` (full disk, size limit, ...)."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return WeakTrError(
            f"cannot write {path}: {reason}",
            hint="free disk space (or raise the file-size limit, `ulimit -f`) and rerun the "
                 "same command: it resumes from what was written",
        )
    return WeakTrError(f"cannot write {path}: {reason}",
                       hint="check the folder's permissions and free space")


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when `a` and `b` name the same file (symbolic and hard links followed)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist: compare where they would be
        return Path(a).resolve() == Path(b).resolve()


def check_output_path(path: str | Path, *, inputs: Iterable[str | Path] = (),
                      option: str = "--out") -> Path:
    """Refuse, before any work, an output that is a folder, lies in a folder that is missing
    or not writable, or is one of the run's own `inputs`."""
    path = Path(path)
    if path.is_dir():
        raise WeakTrError(f"{option} {path} is an existing folder",
                          hint=f"give a file path, e.g. {option} {path / 'out.h5'}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise WeakTrError(f"output folder {folder} does not exist",
                          hint="create it first, or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise WeakTrError(f"output folder {folder} is not writable",
                          hint=f"choose a {option} in a folder you can write to")
    for source in inputs:
        if same_file(path, source):
            raise WeakTrError(
                f"{option} {path} is also an input of this run ({source}); writing it would "
                "replace the input",
                hint=f"choose another {option}",
            )
    return path


@contextlib.contextmanager
def output_lock(path: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on `<path>.lock` for the block; a second writer of the same
    output gets a `WeakTrError` naming the holder's PID.

    flock locks die with their process, so a killed run leaves no stale lock. The holder
    removes the lock file when done; a waiter that locked a file removed meanwhile retries.
    """
    path = Path(path)
    lock_path = path.with_name(path.name + LOCK_SUFFIX)
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise write_error(lock_path, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WeakTrError(
                f"{path} is being written by another weaktr process (PID {holder})",
                hint="wait for it to finish, or write to another --out",
            ) from None
        except OSError as exc:  # a file system without locks (some network mounts)
            os.close(fd)
            raise WeakTrError(f"cannot lock {lock_path}: {exc.strerror}",
                              hint="write the output to a local disk") from exc
        if _is_current(fd, lock_path):
            break
        os.close(fd)
    _HELD_LOCKS.add(fd)
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            raise write_error(lock_path, exc) from exc
        yield lock_path
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()
        _HELD_LOCKS.discard(fd)
        os.close(fd)


def _is_current(fd: int, lock_path: Path) -> bool:
    """True when the locked descriptor is still the file at `lock_path`."""
    try:
        here, there = os.fstat(fd), os.stat(lock_path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
