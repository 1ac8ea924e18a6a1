"""Pseudo-label seeds for retraining: a ``labels`` artifact, or ``cams`` plus a background level."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from weaktr_cli.artifacts import ArtifactReader, open_artifact
from weaktr_cli.data.base import SegmentationDataset
from weaktr_cli.errors import WeakTrError

__all__ = ["SeedSource", "check_seeds"]


class SeedSource:
    """Pseudo-label seeds per image id: a ``labels`` artifact, or ``cams`` + a background level.

    `label(image_id)` gives an (H, W) uint8 map of class ids (255 = ignore). For a ``cams``
    artifact it is `weaktr_cli.seeds.cams_to_label(record, bg)` computed on the fly (no CRF).
    The HDF5 file is opened lazily in each process, so the object can be handed to DataLoader
    workers (h5py handles must not cross a fork).
    """

    def __init__(self, path: str | Path, *, bg: float | None = None) -> None:
        self.path = Path(path)
        self._reader: ArtifactReader | None = None
        self._pid = -1
        reader = self._open()
        self.kind = reader.kind
        self.ids: list[str] = list(reader.ids)
        self.class_names: tuple[str, ...] = tuple(reader.meta.class_names)
        self.dataset = reader.meta.dataset
        self.split = reader.meta.split
        if self.kind == "cams":
            from weaktr_cli.seeds import check_bg

            if bg is None:
                raise WeakTrError(
                    f"{self.path} holds CAMs: a background threshold is needed to make seeds",
                    hint="pass --bg (WeakTr: 0.43 VOC, 0.42 COCO) or give a seeds artifact",
                )
            self.bg: float | None = check_bg(bg)
        else:
            if bg is not None:
                raise WeakTrError(
                    f"{self.path} holds label maps; a background threshold only applies to CAMs",
                    hint="drop --bg",
                )
            self.bg = None

    def _open(self) -> ArtifactReader:
        if self._reader is None or self._pid != os.getpid():
            self._reader = open_artifact(self.path)
            self._pid = os.getpid()
        return self._reader

    def __len__(self) -> int:
        return len(self.ids)

    def label(self, image_id: str) -> np.ndarray:
        """(H, W) uint8 class ids of one image (255 = ignore)."""
        reader = self._open()
        if reader.kind == "labels":
            return reader.read_labels(image_id)
        from weaktr_cli.seeds import cams_to_label

        assert self.bg is not None
        return cams_to_label(reader.read_cams(image_id), self.bg)

    def describe(self) -> dict[str, Any]:
        """Provenance of the seeds for the checkpoint (path, kind, bg, sha256)."""
        from weaktr_cli.artifacts import file_sha256

        return {"path": str(self.path.resolve()), "kind": self.kind, "bg": self.bg,
                "sha256": file_sha256(self.path)}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"] = None  # reopened in the worker
        state["_pid"] = -1
        return state

    def close(self) -> None:
        if self._reader is not None and self._pid == os.getpid():
            self._reader.close()
        self._reader = None

    def __enter__(self) -> SeedSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_seeds(seeds: SeedSource, dataset: SegmentationDataset) -> list[str]:
    """The seeded ids in dataset order; seeds of ids the dataset lacks are an error."""
    from weaktr_cli.data.align import align_ids

    ids = align_ids(str(seeds.path), seeds.class_names, seeds.ids, dataset,
                    hint="pass the dataset and split the seeds were made from")
    if not ids:
        raise WeakTrError(f"{seeds.path} holds no seeds to train on")
    return ids
