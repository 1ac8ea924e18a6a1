"""`ImageFolderDataset`: any folder of photos, for prediction on images without annotations."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from weaktr_cli.data.base import UnmaskedDataset
from weaktr_cli.data.images import read_rgb
from weaktr_cli.errors import WeakTrError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class ImageFolderDataset(UnmaskedDataset):
    """The images (jpg/jpeg/png, any case) directly inside `folder`, ids = file stems, sorted.

    No labels of any kind: `image_labels` is empty, `load_mask` None, `has_masks` False.
    Images are read as a photo viewer shows them: the EXIF orientation is applied
    (`orientation` = "exif"), so a phone photo taken upright gets an upright mask.
    `class_names` are those of the model that will predict on it (index 0 "background").
    Two files with the same stem (a.jpg and a.png) are an error, as ids must be unique.
    """

    orientation = "exif"

    def __init__(
        self,
        folder: str | Path,
        class_names: Sequence[str],
        *,
        name: str = "folder",
        recursive: bool = False,
    ) -> None:
        self.root = Path(folder).expanduser()
        if not self.root.is_dir():
            raise WeakTrError(f"image folder {self.root} does not exist")
        names = tuple(class_names)
        if len(names) < 2 or names[0] != "background":
            raise WeakTrError(
                f"class names must start with 'background' and name at least one class, "
                f"got {list(names)[:3]}",
                hint="use the class names of the checkpoint that predicts",
            )
        self.name = name
        self.split = self.root.name or str(self.root)
        self.class_names = names
        pattern = "**/*" if recursive else "*"
        files = sorted(
            p for p in self.root.glob(pattern)
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        paths: dict[str, Path] = {}
        for path in files:
            image_id = path.relative_to(self.root).with_suffix("").as_posix()
            if image_id in paths:
                raise WeakTrError(
                    f"two images in {self.root} have the id {image_id!r}: "
                    f"{paths[image_id].name} and {path.name}",
                    hint="rename one of them; ids are file names without the suffix",
                )
            paths[image_id] = path
        if not paths:
            raise WeakTrError(
                f"no images ({', '.join(IMAGE_SUFFIXES)}) in {self.root}",
                hint="pass a folder that holds the photos directly"
                + ("" if recursive else " (or search subfolders)"),
            )
        self._paths = paths
        self.ids = sorted(paths)

    def image_path(self, image_id: str) -> Path:
        """Path of the file of `image_id`."""
        try:
            return self._paths[image_id]
        except KeyError:
            raise WeakTrError(f"no image {image_id!r} in {self.root}") from None

    def load_image(self, image_id: str) -> np.ndarray:
        """(H, W, 3) uint8 RGB, C-contiguous and writable."""
        return read_rgb(self.image_path(image_id), exif_orientation=True)

    def image_labels(self, image_id: str) -> np.ndarray:
        """Always empty: a plain image folder has no image-level labels."""
        return np.zeros(0, dtype=np.int64)
