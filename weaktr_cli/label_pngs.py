"""The label maps of a ``labels`` artifact as palette PNGs (torch-free, for `predict --onnx`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from weaktr_cli.artifacts import open_artifact
from weaktr_cli.errors import WeakTrError

__all__ = ["GROUND_TRUTH_DIRS", "check_png_dir", "write_png_dir"]

#: Folder names that hold pixel ground truth (VOC's masks, COCO's label PNGs under them).
GROUND_TRUTH_DIRS = ("SegmentationClass", "SegmentationClassAug")


def check_png_dir(folder: str | Path) -> Path:
    """Refuse a PNG output folder that is, or lies inside, a dataset's ground-truth folder:
    predictions written there would replace the masks they are scored against."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise WeakTrError(f"--png-dir {folder} is a file, not a folder")
    inside = [p for p in (folder.resolve(), *folder.resolve().parents)
              if p.name in GROUND_TRUTH_DIRS]
    if inside:
        raise WeakTrError(
            f"--png-dir {folder} is inside the ground-truth folder {inside[-1]}: the predictions "
            "would overwrite the masks they are evaluated against",
            hint="write the PNGs to a folder of their own, e.g. --png-dir preds_png",
        )
    return folder


def write_png_dir(artifact_path: str | Path, folder: str | Path,
                  palette: Sequence[int] | None = None) -> int:
    """Write every label map of a ``labels`` artifact as `<folder>/<id>.png` (palette PNG,
    pixel value = class id, VOC colours by default); returns the number of files written."""
    from weaktr_cli.data.images import write_label_png

    folder = check_png_dir(folder)
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
