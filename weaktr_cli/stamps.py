"""Make-style phases: run a phase only when its settings or inputs changed since it last ran.

Each phase leaves a stamp, `<work>/.stamps/<phase>.json`, holding a key made of its settings and
the identity (name, size, mtime) of its input files, its wall time and its result. A phase whose
outputs exist and whose key is unchanged is skipped and reports the stamp's time and result; a
forced phase, or one that had to run, makes every later phase run too.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weaktr_cli.files import atomic_write_text

Log = Callable[[str], None]


@dataclass
class PhaseRecord:
    name: str
    skipped: bool
    wall_s: float
    outputs: list[Path]
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.outputs if p.is_file())



def _identity(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path.name), stat.st_size, stat.st_mtime_ns]


class StampedRunner:
    """Runs phases with stamps; a forced or re-run phase forces everything after it."""

    def __init__(self, work: Path, force: tuple[str, ...], log: Log) -> None:
        self.work = work
        self.stamps = work / ".stamps"
        self.stamps.mkdir(parents=True, exist_ok=True)
        self.force = set(force)
        self.log = log
        self.records: list[PhaseRecord] = []
        self._dirty = False

    def run(self, name: str, outputs: list[Path], settings: dict[str, Any], inputs: list[Path],
            action: Callable[[], dict[str, Any]]) -> PhaseRecord:
        key = hashlib.sha256(json.dumps(
            {"settings": settings, "inputs": [_identity(p) for p in inputs]},
            sort_keys=True, default=str).encode()).hexdigest()
        stamp_path = self.stamps / f"{name}.json"
        stamp = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
        fresh = (stamp.get("key") == key and all(p.exists() for p in outputs)
                 and name not in self.force and not self._dirty)
        if fresh:
            self.log(f"[dim]{name}: up to date, skipped[/]")
            record = PhaseRecord(name, True, float(stamp.get("wall_s", 0.0)), outputs,
                                 stamp.get("result", {}))
        else:
            self._dirty = True
            self.log(f"[bold]{name}[/] ...")
            started = time.perf_counter()
            result = action()
            wall = time.perf_counter() - started
            record = PhaseRecord(name, False, wall, outputs, result)
            atomic_write_text(stamp_path, json.dumps(
                {"key": key, "wall_s": wall, "result": result}, indent=2, default=str))
            self.log(f"{name}: done in {wall:.1f} s")
        self.records.append(record)
        return record
