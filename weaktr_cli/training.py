"""The skeleton both training phases share (`train_cam`, `retrain`).

`training_run(out, options, ...)` sets up one run: the torchrun process group (gloo on CPU),
the seed of this rank, deterministic kernels and the training precision; it yields a
`TrainingRun` that wraps the model for DDP, writes `<out>.last` (the newest weights, a
checkpoint) and `<out>.state` (optimizer, counters, RNG: plain values and tensors, no pickle),
reports (log lines, JSONL records, progress) as its `TrainingOptions` say and, on resume,
refuses a state written by a run with other settings before loading anything. The phase keeps
its own loop, loss and log records.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weaktr_cli.checkpoints import (
    load_checkpoint,
    load_training_state,
    save_checkpoint,
    save_training_state,
)
from weaktr_cli.errors import WeakTrError
from weaktr_cli.runtime import (
    DistInfo,
    configure_determinism,
    distributed,
    resolve_precision,
    seed_everything,
)

__all__ = ["TrainingOptions", "TrainingRun", "check_same_settings", "state_paths",
           "training_run"]

#: The key of `<out>.state` that holds the settings a resumed run must share.
SETTINGS_KEY = "config"


@dataclass(frozen=True)
class TrainingOptions:
    """How a training run is carried out and reported, the same for both phases.

    device: "auto", "cpu", "cuda" or "cuda:N"; resume: continue an interrupted run of the same
    `out` from `<out>.last` and `<out>.state`; log: a line printer; log_jsonl: a file that gets
    one JSON record per logged epoch or step; progress: `progress(step, total)`. Records and
    progress come from the main process only.
    """

    device: str = "auto"
    resume: bool = False
    log: Callable[[str], None] | None = None
    log_jsonl: str | Path | None = None
    progress: Callable[[int, int], None] | None = None


def per_process_batch(batch_size: int, global_batch: bool, world: int) -> int:
    """Images per process and step: `batch_size`, or with `global_batch` (the reference's
    convention, hustvl/WeakTr OnlineRetraining/segm/train.py:160) `batch_size // world`."""
    if not global_batch:
        return batch_size
    if batch_size < world:
        raise WeakTrError(f"a global batch of {batch_size} does not split over {world} "
                          "processes", hint="raise --batch-size")
    return batch_size // world


def state_paths(out: Path) -> tuple[Path, Path]:
    """`<out>.last` (newest weights) and `<out>.state` (everything else a resume needs)."""
    return out.with_name(out.name + ".last"), out.with_name(out.name + ".state")


def check_same_settings(state: Mapping[str, Any], settings: Mapping[str, Any], path: Path
                        ) -> None:
    """Refuse to resume from `state` unless it was written with `settings` (JSON-compared)."""
    if SETTINGS_KEY not in state:
        raise WeakTrError(
            f"{path} does not record the settings of its run, so resuming it cannot be checked",
            hint="start a new run without --resume",
        )
    before = json.loads(state[SETTINGS_KEY])
    now = json.loads(json.dumps(settings, sort_keys=True, default=str))
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        raise WeakTrError(
            f"{path} was written by a run with other settings ({', '.join(changed)})",
            hint="resume with the same settings, or start a new run without --resume",
        )


@dataclass
class TrainingRun:
    """One process's view of a training run (see the module docstring)."""

    out: Path
    dist: DistInfo
    device: torch.device
    precision: str
    #: the settings `<out>.state` records and a resume must match
    settings: dict[str, Any]
    options: TrainingOptions = field(default_factory=TrainingOptions)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def world(self) -> int:
        return self.dist.world_size

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` under DistributedDataParallel when several processes train, else itself."""
        if not self.dist.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        dev = self.device
        return DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def resume(self, model: torch.nn.Module, kind: str) -> dict[str, Any]:
        """Check `<out>.state` against this run's settings, load `<out>.last` into `model`,
        and return the state for the phase to restore its optimizer, counters and RNG."""
        last_path, state_path = state_paths(self.out)
        state = load_training_state(state_path)
        check_same_settings(state, self.settings, state_path)
        weights, _ = load_checkpoint(last_path, kind=kind)
        model.load_state_dict(weights)
        return state

    def save_last(self, model: torch.nn.Module, meta: dict[str, Any]) -> None:
        """Write `<out>.last`, the newest weights (main process only)."""
        if self.is_main:
            save_checkpoint(state_paths(self.out)[0], model.state_dict(), meta)

    def save_state(self, state: dict[str, Any]) -> None:
        """Write `<out>.state` with this run's settings (main process only); after
        `save_last`, so a resume never sees a state newer than its weights."""
        if self.is_main:
            settings = json.dumps(self.settings, sort_keys=True, default=str)
            save_training_state(state_paths(self.out)[1], {**state, SETTINGS_KEY: settings})

    def say(self, message: str) -> None:
        """A log line, to `options.log` if given."""
        if self.options.log is not None:
            self.options.log(message)

    def log_record(self, record: dict[str, Any]) -> None:
        """Append one log record to `options.log_jsonl` if given (main process only)."""
        if self.options.log_jsonl and self.is_main:
            with open(self.options.log_jsonl, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def report_progress(self, step: int, total: int) -> None:
        """`options.progress(step, total)` if given (main process only)."""
        if self.options.progress is not None and self.is_main:
            self.options.progress(step, total)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the processes (the values themselves in a single process)."""
        if not self.dist.enabled:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return [float(v) for v in t.cpu().tolist()]


@contextlib.contextmanager
def training_run(out: Path, options: TrainingOptions, *, seed: int, precision: str,
                 settings: dict[str, Any]) -> Iterator[TrainingRun]:
    """Set up a (possibly distributed) training run writing to `out`; see `TrainingRun`.

    Every process waits for the others at the end, so no rank returns before the main one has
    written the final checkpoint.
    """
    with distributed(options.device) as (dist_info, dev):
        seed_everything(seed, dist_info.rank)
        configure_determinism(True)
        run = TrainingRun(out=out, dist=dist_info, device=dev,
                          precision=resolve_precision(precision, dev, training=True),
                          settings=settings, options=options)
        yield run
        if dist_info.enabled:
            import torch.distributed as dist

            dist.barrier()
