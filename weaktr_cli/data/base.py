"""The dataset interface every phase reads: images, image-level labels, optional pixel masks.

Class ids are the dataset's own: 0 is background, foreground ids are 1..num_classes-1 (COCO
keeps its 91 category ids with gaps; unused ids have an empty name). 255 marks ignored pixels.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from weaktr_cli.errors import WeakTrError

IGNORE_INDEX = 255


class SegmentationDataset(abc.ABC):
    """A split of a dataset: ordered image ids, images, image-level labels and (maybe) masks."""

    #: registry name of the dataset family ("voc", "coco", "shapes", ...)
    name: str
    #: split name or list-file path this object was opened with
    split: str
    #: class_names[i] is the name of class id i; index 0 is "background"; "" marks an unused id
    class_names: tuple[str, ...]
    #: image ids in split order
    ids: list[str]
    #: the folder the images are read from (None: generated or in memory); artifacts record
    #: it so later phases reopen the dataset without --data-root
    root: Path | None = None
    #: how `load_image` orients pixels: "stored" (the file's pixel grid, which VOC/COCO masks
    #: and polygons use) or "exif" (the EXIF orientation applied, as a photo viewer shows it)
    orientation: str = "stored"

    @property
    def num_classes(self) -> int:
        """Number of class ids including background (VOC 21, COCO 91)."""
        return len(self.class_names)

    @property
    def foreground_ids(self) -> np.ndarray:
        """int64 ids of the classes a CAM model has a token for (1..num_classes-1)."""
        return np.arange(1, self.num_classes, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    @abc.abstractmethod
    def load_image(self, image_id: str) -> np.ndarray:
        """The image as an RGB (H, W, 3) uint8 array (C-contiguous, writable)."""

    @abc.abstractmethod
    def image_labels(self, image_id: str) -> np.ndarray:
        """Sorted int64 foreground class ids present in the image (never 0 or 255)."""

    @abc.abstractmethod
    def load_mask(self, image_id: str) -> np.ndarray | None:
        """Pixel ground truth as (H, W) uint8 class ids with 255 = ignore, or None if unknown."""

    @property
    @abc.abstractmethod
    def has_masks(self) -> bool:
        """True when every image of the split has pixel ground truth."""

    def label_vector(self, image_id: str) -> np.ndarray:
        """Multi-hot float32 vector of length num_classes-1; entry i is class id i+1."""
        vec = np.zeros(self.num_classes - 1, dtype=np.float32)
        vec[self.image_labels(image_id) - 1] = 1.0
        return vec

    def subset(self, ids: Sequence[str]) -> SegmentationDataset:
        """A view of this dataset restricted to `ids` (kept in the given order)."""
        return _Subset(self, list(ids))


class UnmaskedDataset(SegmentationDataset):
    """A dataset without pixel ground truth (a folder of photos, a synthetic set of image-level
    labels): `load_mask` is None and `has_masks` False."""

    def load_mask(self, image_id: str) -> np.ndarray | None:
        return None

    @property
    def has_masks(self) -> bool:
        return False


def unknown_id(dataset: SegmentationDataset, image_id: str) -> WeakTrError:
    """The error for an image id the split does not hold, with a few ids that it does."""
    sample = ", ".join(dataset.ids[:3]) + (", ..." if len(dataset.ids) > 3 else "")
    return WeakTrError(
        f"no image {image_id!r} in {dataset.name}/{dataset.split}",
        hint=f"ids look like {sample}" if sample else "the split is empty",
    )


class _Subset(SegmentationDataset):
    def __init__(self, parent: SegmentationDataset, ids: list[str]) -> None:
        self._parent = parent
        self.name = parent.name
        self.split = parent.split
        self.class_names = parent.class_names
        self.ids = ids
        self.root = parent.root
        self.orientation = parent.orientation

    def load_image(self, image_id: str) -> np.ndarray:
        return self._parent.load_image(image_id)

    def image_labels(self, image_id: str) -> np.ndarray:
        return self._parent.image_labels(image_id)

    def load_mask(self, image_id: str) -> np.ndarray | None:
        return self._parent.load_mask(image_id)

    @property
    def has_masks(self) -> bool:
        return self._parent.has_masks
