"""Names of the datasets weaktr knows (kept import-light: the CLI builds its options from it)."""

from __future__ import annotations

from enum import Enum


class DatasetName(str, Enum):
    shapes = "shapes"
    voc = "voc"
    coco = "coco"

    def __str__(self) -> str:
        return self.value
