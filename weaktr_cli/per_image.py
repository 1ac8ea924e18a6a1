"""How a model runs over the images of a split into an artifact, for `dump_cams` and
`predict_split`: which split into which artifact path, on which device, over which shard,
resuming `<out>.partial` or not, and whom to tell of the progress. The phase supplies what to
compute per image; `PerImageRun.write` is the loop around it
(`weaktr_cli.artifact_writer.write_artifact`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weaktr_cli.artifact_writer import Producer, write_artifact
from weaktr_cli.artifacts import ArtifactMeta
from weaktr_cli.data.base import SegmentationDataset
from weaktr_cli.shards import select_shard

__all__ = ["PerImageRun"]


@dataclass(frozen=True)
class PerImageRun:
    """The job "this split -> this artifact": dataset: the split whose images are computed;
    out_path: the artifact written (through `<out_path>.partial`); device: "auto", "cpu",
    "cuda" or "cuda:N"; shard: (K, N) for every N-th image from the K-th (1-based; None: all);
    resume: skip the images a resumable `<out_path>.partial` holds; progress:
    `progress(n_done, n_total)`, before the first image and after each one."""

    dataset: SegmentationDataset
    out_path: str | Path
    device: str = "auto"
    shard: tuple[int, int] | None = None
    resume: bool = True
    progress: Callable[[int, int], None] | None = None

    def config(self) -> dict[str, Any]:
        """What the artifact records of the run (the shard; `weaktr merge` joins shards)."""
        return {"shard": list(self.shard) if self.shard else None}

    def write(self, meta: ArtifactMeta, produce: Producer) -> Path:
        """`produce`'s entries for this run's shard of the dataset's ids, written to
        `out_path`; returns the final artifact path."""
        return write_artifact(self.out_path, meta, select_shard(self.dataset.ids, self.shard),
                              produce, resume=self.resume, progress=self.progress)
