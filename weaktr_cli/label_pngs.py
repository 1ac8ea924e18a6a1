"""The label maps of a ``labels`` artifact as palette PNGs (torch-free, for `predict --onnx`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from weaktr_cli.artifacts import open_artifact
from weaktr_cli.errors import WeakTrError

__all__ = ["write_png_dir"]


def write_png_dir(artifact_path: str | Path, folder: str | Path,
                  palette: Sequence[int] | None = None) -> int:
    """Write every label map of a ``labels`` artifact as `<folder>/<id>.png` (palette PNG,
    pixel value = class id, VOC colours by default); returns the number of files written."""
    from weaktr_cli.data.images import write_label_png

    folder = Path(folder)
    root = folder.resolve()
    count = 0
    with open_artifact(artifact_path, kind="labels") as reader:
        for image_id in reader.ids:
            path = folder / f"{image_id}.png"
            # An id is a relative path at most (COCO-style subfolders); never leave the folder.
            if root not in path.resolve().parents:
                raise WeakTrError(f"image id {image_id!r} would be written outside {folder}")
            write_label_png(path, reader.read_labels(image_id), palette)
            count += 1
    return count
