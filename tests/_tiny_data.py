"""A tiny synthetic dataset and CAM artifact for the seeds tests.

It lives in its own module (not inside a test) because `make_seeds(workers=2)` pickles the
dataset into spawn workers, which must import its class by module name. Images are generated
from the id on demand, so the pickled object stays small.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from weaktr_cli.artifacts import ArtifactWriter, new_meta
from weaktr_cli.data.base import UnmaskedDataset

CLASS_NAMES = ("background", "disc", "square", "bar")
HEIGHT, WIDTH = 30, 40


def blob(h: int, w: int, cy: float, cx: float, sy: float, sx: float) -> np.ndarray:
    """A smooth Gaussian bump (H, W) float32 peaking at 1 at (cy, cx)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.exp(-(((y - cy) / sy) ** 2 + ((x - cx) / sx) ** 2)).astype(np.float32)


class TinyDataset(UnmaskedDataset):
    """`n` RGB images of HEIGHT x WIDTH with two coloured rectangles (two classes) on noise."""

    name = "tiny"

    def __init__(self, n: int = 4, seed: int = 0) -> None:
        self.split = "train"
        self.class_names = CLASS_NAMES
        self.ids = [f"img{i:02d}" for i in range(n)]
        self._seed = seed

    def _layout(self, image_id: str) -> list[tuple[int, int, int, int, int]]:
        """[(class_id, y0, y1, x0, x1)] of the image's two objects."""
        rng = np.random.default_rng([self._seed, self.ids.index(image_id)])
        classes = sorted(rng.choice(np.arange(1, len(CLASS_NAMES)), size=2, replace=False))
        boxes = []
        for k, cls in enumerate(classes):
            y0 = int(rng.integers(2, HEIGHT // 2))
            x0 = int(rng.integers(2 + k * WIDTH // 2, WIDTH // 2 + k * WIDTH // 2 - 8))
            boxes.append((int(cls), y0, y0 + 10, x0, x0 + 8))
        return boxes

    def load_image(self, image_id: str) -> np.ndarray:
        rng = np.random.default_rng([self._seed, self.ids.index(image_id), 1])
        image = rng.normal(90, 12, size=(HEIGHT, WIDTH, 3))
        for cls, y0, y1, x0, x1 in self._layout(image_id):
            image[y0:y1, x0:x1] = np.array([60 * cls, 200 - 40 * cls, 120]) + rng.normal(
                0, 12, size=(y1 - y0, x1 - x0, 3)
            )
        return np.ascontiguousarray(np.clip(image, 0, 255).astype(np.uint8))

    def image_labels(self, image_id: str) -> np.ndarray:
        return np.array(sorted(c for c, *_ in self._layout(image_id)), dtype=np.int64)

    def cams(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(class_ids int64 (2,), maps float32 (2, H, W)): a blurry, shifted blob per object."""
        ids, maps = [], []
        for cls, y0, y1, x0, x1 in self._layout(image_id):
            cy, cx = (y0 + y1) / 2 + 1.5, (x0 + x1) / 2 - 1.0  # CAMs are never centred exactly
            ids.append(cls)
            maps.append(blob(HEIGHT, WIDTH, cy, cx, 6.0, 5.0))
        return np.array(ids, dtype=np.int64), np.stack(maps)


def write_tiny_cams(
    path: Path, dataset: TinyDataset, *, sizes: dict[str, tuple[int, int]] | None = None
) -> Path:
    """Write the dataset's CAMs as a finished ``cams`` artifact; `sizes` overrides map sizes."""
    meta = new_meta("cams", dataset.name, dataset.split, dataset.class_names, seed=0)
    with ArtifactWriter(path, meta, resume=False) as writer:
        for image_id in dataset.ids:
            class_ids, maps = dataset.cams(image_id)
            if sizes and image_id in sizes:
                h, w = sizes[image_id]
                maps = np.stack([blob(h, w, h / 2, w / 2, 6.0, 5.0) for _ in class_ids])
            writer.write_cams(image_id, class_ids, maps)
        return writer.finalize()
