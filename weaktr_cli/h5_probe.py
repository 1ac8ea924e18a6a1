"""Read a possibly damaged HDF5 file in a child process before trusting it in this one.

libhdf5 raises errors for most damage, but some byte flips make it crash (SIGSEGV) while it
parses an attribute or a chunk index, and no exception can catch that. A resumed run reads
its own unfinished `.partial` file, which an interrupted write or a bad disk may have
damaged, so it first reads the whole file in a forked child: if the child dies by a signal,
the file is treated as damaged (started over) instead of taking the run down with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any


def reads_without_crashing(path: str | Path, *, root_only: bool = False) -> bool:
    """Whether reading every attribute and dataset of `path` ends without a crash;
    `root_only`: the root attributes only (cheap for any file size; where weaktr keeps its
    variable-length strings, whose damage is what crashed libhdf5 in the fuzz tests).

    Errors (a file HDF5 refuses, a truncated dataset) count as "no crash": the caller's own
    reading reports them. Where `fork` is missing (Windows) this returns True untested.
    """
    if not hasattr(os, "fork"):
        return True
    pid = os.fork()
    if pid == 0:  # the child: read everything, exit without running any cleanup of the parent
        try:
            import faulthandler

            faulthandler.disable()  # a crash here is expected and reported by the parent
            _read(Path(path), root_only)
        finally:
            os._exit(0)
    try:
        _, status = os.waitpid(pid, 0)  # retried on EINTR by Python itself (PEP 475)
    except BaseException:  # Ctrl-C while waiting: do not leave the child behind
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    return not os.WIFSIGNALED(status)


def _read(path: Path, root_only: bool) -> None:
    import h5py

    def visit(_name: str, obj: Any) -> None:
        for key in obj.attrs:
            obj.attrs.get(key)
        if isinstance(obj, h5py.Dataset):
            obj[()]

    # Errors are the caller's to report when it reads the file itself; crashes are ours.
    with contextlib.suppress(Exception), h5py.File(path, "r") as h5:
        visit("/", h5)
        if not root_only:
            h5.visititems(visit)
