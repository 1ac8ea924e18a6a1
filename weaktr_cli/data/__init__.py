"""Dataset registry: `open_dataset("voc", "train", root)` and friends.

Dataset roots come from `--data-root`, else `$WEAKTR_DATA_ROOT`; the built-in `shapes`
dataset needs no root (it is generated into the cache on first use).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weaktr_cli.data.base import IGNORE_INDEX, SegmentationDataset
from weaktr_cli.errors import WeakTrError
from weaktr_cli.names import DatasetName

if TYPE_CHECKING:
    from weaktr_cli.artifacts import ArtifactMeta

DATASETS = tuple(d.value for d in DatasetName)
DEFAULT_SPLITS = {"shapes": "train", "voc": "train", "coco": "train"}
#: the dataset name of artifacts made by `predict --images` (their data_root is the folder)
FOLDER = "folder"

__all__ = ["DATASETS", "FOLDER", "IGNORE_INDEX", "SegmentationDataset", "check_dataset",
           "open_artifact_dataset", "open_dataset", "survey_dataset"]


def resolve_root(name: str, root: str | Path | None) -> Path | None:
    """The dataset root: the given one, else $WEAKTR_DATA_ROOT; required except for shapes."""
    if name == "shapes":
        # The built-in dataset lives in $WEAKTR_CACHE; a data root meant for VOC or COCO must
        # not fill up with generated folders.
        return None if root is None else Path(root).expanduser()
    if root is None and os.environ.get("WEAKTR_DATA_ROOT"):
        root = os.environ["WEAKTR_DATA_ROOT"]
    if root is None:
        raise WeakTrError(
            f"dataset {name!r} needs a data root",
            hint="pass --data-root DIR or set WEAKTR_DATA_ROOT",
        )
    path = Path(root).expanduser()
    if not path.exists():
        raise WeakTrError(f"data root {path} does not exist", hint="check --data-root")
    return path


def _check_name(name: str) -> str:
    name = str(name)
    if name not in DATASETS:
        raise WeakTrError(
            f"unknown dataset {name!r}",
            hint=f"for a dataset of your own, pass --data-root of the folder whose "
            f"weaktr_dataset.json names it {name!r}; built-in: {', '.join(DATASETS)}",
        )
    return name


def open_dataset(name: str, split: str, root: str | Path | None = None) -> SegmentationDataset:
    """Open split `split` of dataset `name` ("shapes", "voc" or "coco").

    Any other name is a user's own dataset in the VOC layout whose `weaktr_dataset.json`
    carries that name (artifacts record it), opened from `root`.
    """
    if str(name) not in DATASETS and (root is not None or os.environ.get("WEAKTR_DATA_ROOT")):
        from weaktr_cli.data.voc import VocDataset

        dataset = VocDataset(resolve_root("voc", root), split)  # type: ignore[arg-type]
        if dataset.name != str(name):
            raise WeakTrError(
                f"the dataset at {root} is {dataset.name!r}, not {name!r}",
                hint="pass --data-root of the dataset the artifact was made from",
            )
        return dataset
    name = _check_name(name)
    path = resolve_root(name, root)
    if name == "shapes":
        from weaktr_cli.data.shapes import open_shapes

        return open_shapes(split, root=path)
    if name == "voc":
        from weaktr_cli.data.voc import VocDataset

        assert path is not None
        return VocDataset(path, split)
    from weaktr_cli.data.coco import CocoDataset

    assert path is not None
    return CocoDataset(path, split)


def open_artifact_dataset(meta: ArtifactMeta, *, data: str | None = None,
                          split: str | None = None,
                          root: str | Path | None = None) -> SegmentationDataset:
    """The dataset an artifact was made from; `data`, `split` and `root` override its record.

    Without `root`, the folder the artifact records (`meta.data_root`) is used while it
    exists, so a custom dataset or a `predict --images` folder needs no --data-root.
    """
    name = str(data or meta.dataset)
    recorded = Path(meta.data_root) if meta.data_root and name == meta.dataset else None
    if root is None and recorded is not None and recorded.exists():
        root = recorded
    if name == FOLDER:
        from weaktr_cli.data.folder import ImageFolderDataset

        if root is None:
            raise WeakTrError(
                f"the image folder of this {meta.kind} artifact is unknown or gone"
                + (f" ({meta.data_root})" if meta.data_root else ""),
                hint="pass --data-root FOLDER, the folder given to `predict --images`",
            )
        return ImageFolderDataset(root, meta.class_names)
    return open_dataset(name, split or meta.split, root)


def check_dataset(name: str, root: str | Path | None = None) -> list[str]:
    """Problems with a dataset layout, as human-readable lines (empty when it is usable)."""
    problems: list[str] = survey_dataset(name, root)["problems"]
    return problems


def survey_dataset(name: str, root: str | Path | None = None) -> dict[str, Any]:
    """A dataset layout's problems, notes (e.g. no pixel masks: optional), per-split image,
    mask and image-level label counts, and the data root actually used (--data-root, else
    $WEAKTR_DATA_ROOT, else the shapes cache)."""
    name = _check_name(name)
    path = resolve_root(name, root)
    if name == "coco":
        from weaktr_cli.data.coco import survey_coco_layout

        assert path is not None
        report = survey_coco_layout(path)
    else:
        from weaktr_cli.data.voc import survey_voc_layout

        if name == "shapes":
            from weaktr_cli.data.shapes import ShapesConfig, ensure_shapes, find_shapes

            # Without a root the built-in dataset is generated into the cache; a given root
            # must already hold one (a typo is reported, never filled with a new dataset).
            if path is None:
                path = ensure_shapes(ShapesConfig())
            else:
                try:
                    path = find_shapes(path)
                except WeakTrError as exc:
                    return {"data_root": str(path), "problems": [exc.message], "notes": [],
                            "splits": {}, "cls_labels_file": None}
        assert path is not None
        report = survey_voc_layout(path)
    return {"data_root": str(path.resolve()), **report}
