"""Pseudo-label seeds for retraining: a ``labels`` artifact, or ``cams`` plus a background level."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from weaktr_cli.artifacts import ArtifactReader, open_artifact
from weaktr_cli.data.base import IGNORE_INDEX, SegmentationDataset
from weaktr_cli.errors import WeakTrError

__all__ = ["SeedSource", "check_seeds"]


class SeedSource:
    """Pseudo-label seeds per image id: a ``labels`` artifact, or ``cams`` + a background level.

    `label(image_id)` gives an (H, W) uint8 map of class ids (255 = ignore). For a ``cams``
    artifact it is `weaktr_cli.seeds.cams_to_label(record, bg)` computed on the fly (no CRF).
    With `ambiguity` (a ratio in (0, 1]), foreground seed pixels that another class's CAM
    nearly matches are ignored (255; `weaktr_cli.seeds.ambiguous_seed_pixels`), read from
    `cams`, else from the CAM file the seeds were made from (their parent; a ``cams`` source
    is its own).
    The HDF5 files are opened lazily in each process, so the object can be handed to DataLoader
    workers (h5py handles must not cross a fork).
    """

    def __init__(self, path: str | Path, *, bg: float | None = None,
                 cams: str | Path | None = None, ambiguity: float | None = None) -> None:
        self.path = Path(path)
        self._reader: ArtifactReader | None = None
        self._cams_reader: ArtifactReader | None = None
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
        self.ambiguity = ambiguity
        self.cams_path: Path | None = None
        if ambiguity is not None:
            parents = [Path(parent["path"]) for parent in reader.meta.parents]
            self.cams_path = self.path if self.kind == "cams" else _ambiguity_cams(
                cams, self, parents)

    def _open(self) -> ArtifactReader:
        if self._reader is None or self._pid != os.getpid():
            self._reader = open_artifact(self.path)
            self._cams_reader = None
            self._pid = os.getpid()
        return self._reader

    def _cams(self) -> ArtifactReader:
        reader = self._open()
        if self.cams_path == self.path:
            return reader
        if self._cams_reader is None:
            assert self.cams_path is not None
            self._cams_reader = open_artifact(self.cams_path, kind="cams")
        return self._cams_reader

    def __len__(self) -> int:
        return len(self.ids)

    def label(self, image_id: str) -> np.ndarray:
        """(H, W) uint8 class ids of one image (255 = ignore)."""
        from weaktr_cli.seeds import ambiguous_seed_pixels, cams_to_label

        reader = self._open()
        if reader.kind == "labels":
            label = reader.read_labels(image_id)
        else:
            assert self.bg is not None
            label = cams_to_label(reader.read_cams(image_id), self.bg)
        if self.ambiguity is not None:
            record = self._cams().read_cams(image_id)
            label = label.copy()
            label[ambiguous_seed_pixels(label, record, self.ambiguity)] = IGNORE_INDEX
        return label

    def describe(self) -> dict[str, Any]:
        """Provenance of the seeds for the checkpoint (path, kind, bg, sha256)."""
        from weaktr_cli.artifacts import file_sha256

        described: dict[str, Any] = {"path": str(self.path.resolve()), "kind": self.kind,
                                     "bg": self.bg, "sha256": file_sha256(self.path),
                                     "ambiguity": self.ambiguity}
        if self.cams_path is not None and self.cams_path != self.path:
            described["cams"] = {"path": str(self.cams_path.resolve()),
                                 "sha256": file_sha256(self.cams_path)}
        return described

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"] = None  # reopened in the worker
        state["_cams_reader"] = None
        state["_pid"] = -1
        return state

    def close(self) -> None:
        if self._pid == os.getpid():
            for reader in (self._reader, self._cams_reader):
                if reader is not None:
                    reader.close()
        self._reader = self._cams_reader = None

    def __enter__(self) -> SeedSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ambiguity_cams(cams: str | Path | None, seeds: SeedSource, parents: list[Path]) -> Path:
    """The CAM artifact that marks ambiguous seed pixels: `cams`, else the seeds' parent
    (`crf` records the CAM file it read); it must cover the seeds' images."""
    if cams is None:
        cams = next((p for p in parents if p.is_file() and p.suffix == ".h5"), None)
    if cams is None:
        raise WeakTrError(
            "ignoring ambiguous seed pixels needs the CAMs the seeds were made from",
            hint="pass --cams cams.h5, or --ambiguity none",
        )
    path = Path(cams)
    with open_artifact(path, kind="cams") as reader:
        if tuple(reader.meta.class_names) != seeds.class_names:
            raise WeakTrError(f"{path} has other classes than the seeds {seeds.path}",
                              hint="pass the CAMs the seeds were made from")
        missing = [i for i in seeds.ids if i not in reader]
    if missing:
        raise WeakTrError(f"{path} has no CAMs for {len(missing)} seeded image(s), e.g. "
                          f"{missing[0]!r}", hint="pass the CAMs the seeds were made from")
    return path


def check_seeds(seeds: SeedSource, dataset: SegmentationDataset) -> list[str]:
    """The seeded ids in dataset order; seeds of ids the dataset lacks are an error."""
    from weaktr_cli.data.align import align_ids

    ids = align_ids(str(seeds.path), seeds.class_names, seeds.ids, dataset,
                    hint="pass the dataset and split the seeds were made from")
    if not ids:
        raise WeakTrError(f"{seeds.path} holds no seeds to train on")
    return ids
