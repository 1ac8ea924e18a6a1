"""PASCAL VOC 2012 (and any dataset laid out like it) as a `SegmentationDataset`.

Layout, under the *dataset folder* (the one holding JPEGImages; `root` may be that folder,
`VOCdevkit/`, or a folder containing `VOCdevkit/VOC2012`)::

    JPEGImages/<id>.jpg            (or <id>.png: lossless images, e.g. our synthetic dataset)
    SegmentationClass/<id>.png     palette PNGs, pixel = class id, 255 = ignore (object borders)
    SegmentationClassAug/<id>.png  optional, the 10,582-image augmented set; preferred when present
    Annotations/<id>.xml           optional, object names give image-level labels
    ImageSets/Segmentation/{train,val,trainval,train_aug|trainaug}.txt
    cls_labels.npy | cls_labels.json   optional, here or in the parent folder (see below)
    weaktr_dataset.json            optional, names the classes (see below)

List files hold one image per line, either "<id>" or the DeepLab style
"/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png"; the id is taken from the first column.

Bring your own dataset: lay it out as above and add `weaktr_dataset.json`::

    {"name": "shapes", "class_names": ["background", "circle", "square"]}

`class_names[i]` names class id i: index 0 must be "background", at most 255 entries (255 is
the ignore id), "" marks an unused id. Without this file the 20 VOC classes are used.

Image-level labels (`label_source`):
- "masks": the class ids present in the mask (0 and 255 excluded);
- "xml": `Annotations/<id>.xml` object names;
- "cls_labels": `cls_labels.json`, either {"classes": [...], "multi_hot": {id: [0/1, ...]}}
  or {"classes": [...], "labels": {id: [name, ...]}} or {id: [0/1, ...]} (entry i of a
  vector is class id i+1). The community `cls_labels.npy` is a pickled dict, and unpickling a
  downloaded file can run any code: it is never loaded, a one-line error says how to convert
  it to JSON once (`image_labels.CLS_LABELS_CONVERSION`);
- "auto": per image, the cls_labels entry if there is one, else the mask, else the XML.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from weaktr_cli.data.base import IGNORE_INDEX, SegmentationDataset, unknown_id
from weaktr_cli.data.image_labels import (
    find_cls_labels,
    labels_from_mask,
    labels_from_xml,
    load_cls_labels,
)
from weaktr_cli.data.images import read_label_png, read_rgb
from weaktr_cli.errors import WeakTrError

VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

DATASET_INFO_FILE = "weaktr_dataset.json"
LABEL_SOURCES = ("auto", "masks", "xml", "cls_labels")
# JSON first: a converted file next to the community .npy is the one to read.
_IMAGE_SUFFIXES = (".jpg", ".png")
_MASK_DIRS = ("SegmentationClassAug", "SegmentationClass")
_LAYOUT_HINT = (
    "expected a PASCAL VOC layout: VOC2012/{JPEGImages, SegmentationClass, "
    "ImageSets/Segmentation}; pass the VOC2012 folder, VOCdevkit/ or the folder holding VOCdevkit"
)


# ----------------------------------------------------------------------------- layout


def resolve_voc_root(root: str | Path) -> Path:
    """The dataset folder (the one holding JPEGImages) for `root`, VOCdevkit/ or its parent."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise WeakTrError(f"dataset folder {root} does not exist", hint="check the --data path")
    candidates = [root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"]
    for cand in candidates:
        if (cand / "JPEGImages").is_dir():
            return cand
    looked = ", ".join(str(c / "JPEGImages") for c in candidates)
    raise WeakTrError(f"no JPEGImages folder under {root} (looked for {looked})", hint=_LAYOUT_HINT)


_INFO_HINT = 'expected {"name": "mydata", "class_names": ["background", "cat", ...]}'


def read_dataset_info(folder: str | Path) -> tuple[str, tuple[str, ...]] | None:
    """(name, class_names) from `folder/weaktr_dataset.json`, or None when there is no such file."""
    path = Path(folder) / DATASET_INFO_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise WeakTrError(f"cannot read {path}: {exc}", hint=_INFO_HINT) from exc
    return _check_info(info, path)


def _check_info(info: Any, path: Path) -> tuple[str, tuple[str, ...]]:
    names = info.get("class_names") if isinstance(info, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise WeakTrError(f"{path} has no list of strings 'class_names'", hint=_INFO_HINT)
    if len(names) < 2 or names[0] != "background":
        raise WeakTrError(
            f"{path}: class_names must start with 'background' and name at least one class",
            hint=_INFO_HINT,
        )
    if len(names) > IGNORE_INDEX:
        raise WeakTrError(
            f"{path}: {len(names)} classes, at most {IGNORE_INDEX} fit uint8 label maps",
            hint="255 is the ignore id; use ids 0..254",
        )
    used = [n for n in names if n]
    if len(set(used)) != len(used):
        dup = sorted({n for n in used if used.count(n) > 1})
        raise WeakTrError(f"{path}: repeated class names {dup}", hint=_INFO_HINT)
    name = info.get("name", "")
    if not isinstance(name, str):
        raise WeakTrError(f"{path}: 'name' must be a string", hint=_INFO_HINT)
    return name, tuple(names)


def write_dataset_info(folder: str | Path, name: str, class_names: Iterable[str]) -> Path:
    """Write `folder/weaktr_dataset.json` describing a VOC-layout dataset; returns its path."""
    path = Path(folder) / DATASET_INFO_FILE
    payload = {"name": name, "class_names": list(class_names)}
    _check_info(payload, path)  # refuse to write a file we would later reject
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return path


def available_splits(data_dir: Path) -> list[str]:
    """Names of the list files in `data_dir/ImageSets/Segmentation` (without .txt), sorted."""
    seg = data_dir / "ImageSets" / "Segmentation"
    if not seg.is_dir():
        return []
    return sorted(p.stem for p in seg.glob("*.txt") if p.is_file())


def is_list_file_path(split: str) -> bool:
    """Whether `split` names a list file (a path, or a name ending in .txt), not a split."""
    return "/" in split or os.sep in split or Path(split).suffix == ".txt"


def resolve_split_file(data_dir: Path, split: str) -> Path:
    """The list file for a split name ("train", "train_aug", ...) or a list-file path."""
    seg = data_dir / "ImageSets" / "Segmentation"
    as_path = Path(split).expanduser()
    if is_list_file_path(split):
        if as_path.is_file():
            return as_path
        raise WeakTrError(
            f"split list file {as_path} not found", hint="pass a split name or an existing file"
        )
    names = ["train_aug", "trainaug"] if split in ("train_aug", "trainaug") else [split]
    for n in names:
        if (seg / f"{n}.txt").is_file():
            return seg / f"{n}.txt"
    found = available_splits(data_dir)
    raise WeakTrError(
        f"no list file for split '{split}' (looked for "
        + ", ".join(str(seg / f"{n}.txt") for n in names)
        + ")",
        hint=f"splits found: {', '.join(found) if found else 'none'}; "
        "or pass the path of a list file",
    )


def read_list_file(path: Path) -> list[str]:
    """Image ids of a list file: one per line, "id" or "/JPEGImages/id.jpg /Seg.../id.png"."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WeakTrError(f"cannot read split list {path}: {exc}") from exc
    ids: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        image_id = fields[0].rsplit("/", 1)[-1]
        for suffix in (".jpg", ".jpeg", ".png"):
            if image_id.lower().endswith(suffix):
                image_id = image_id[: -len(suffix)]
                break
        if image_id in seen:
            raise WeakTrError(
                f"split list {path} repeats id {image_id}", hint="remove the duplicate line"
            )
        seen.add(image_id)
        ids.append(image_id)
    if not ids:
        raise WeakTrError(f"split list {path} is empty")
    return ids


def _index_folder(folder: Path, suffixes: tuple[str, ...]) -> dict[str, str]:
    """stem -> file name for the files of `folder` with one of `suffixes` (first suffix wins).

    One directory listing instead of a stat per id, and no Path per file (callers join the
    few they need): a few milliseconds even for 17k JPEGs.
    """
    if not folder.is_dir():
        return {}
    rank = {suffix: n for n, suffix in enumerate(suffixes)}
    best: dict[str, tuple[int, str]] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, dot, ext = entry.name.rpartition(".")
            order = rank.get("." + ext.lower()) if dot else None
            # Ties (IMG.png and IMG.PNG) go to the smaller name, as a sorted listing would.
            if order is not None and (stem not in best or (order, entry.name) < best[stem]):
                best[stem] = (order, entry.name)
    return {stem: name for stem, (_, name) in best.items()}


# ----------------------------------------------------------------------------- dataset


class VocDataset(SegmentationDataset):
    """A split of a VOC-layout dataset.

    Attributes beyond `SegmentationDataset`: `root` (the dataset folder holding JPEGImages),
    `list_file` (the split's list file), `label_source`, `cls_labels_file` (or None).
    """

    root: Path

    def __init__(
        self,
        root: str | Path,
        split: str,
        label_source: str = "auto",
        name: str = "voc",
    ) -> None:
        if label_source not in LABEL_SOURCES:
            raise WeakTrError(
                f"unknown label source '{label_source}'", hint=f"use one of {LABEL_SOURCES}"
            )
        self.root = resolve_voc_root(root)
        self.split = split
        self.label_source = label_source
        info = read_dataset_info(self.root)
        self.name = (info[0] or name) if info else name
        self.class_names = info[1] if info else VOC_CLASSES
        self.list_file = resolve_split_file(self.root, split)
        self.ids = read_list_file(self.list_file)

        self._image_dir = self.root / "JPEGImages"
        images = _index_folder(self._image_dir, _IMAGE_SUFFIXES)
        missing = [i for i in self.ids if i not in images]
        if missing:
            raise WeakTrError(
                f"{len(missing)} ids of {self.list_file.name} have no image in "
                f"{self.root / 'JPEGImages'} (first: {missing[0]})",
                hint="expected JPEGImages/<id>.jpg or <id>.png; check the list file and dataset",
            )
        self._images = {i: images[i] for i in self.ids}

        self.cls_labels_file = find_cls_labels(self.root)
        if label_source == "cls_labels" and self.cls_labels_file is None:
            raise WeakTrError(
                f"no cls_labels.json in {self.root} or {self.root.parent}",
                hint="use label_source 'masks' or 'xml', or place the file there",
            )
        self._cls_labels: dict[str, np.ndarray] | None = None
        self._masks: dict[str, Path | None] | None = None
        self._labels: dict[str, np.ndarray] = {}

    # -- pixels

    def image_path(self, image_id: str) -> Path:
        """Path of the image file of `image_id`."""
        try:
            return self._image_dir / self._images[image_id]
        except KeyError:
            raise unknown_id(self, image_id) from None

    def mask_path(self, image_id: str) -> Path | None:
        """SegmentationClassAug/<id>.png if there, else SegmentationClass/<id>.png, else None."""
        if self._masks is None:
            indexes = [(self.root / d, _index_folder(self.root / d, (".png",)))
                       for d in _MASK_DIRS]
            self._masks = {i: next((d / ix[i] for d, ix in indexes if i in ix), None)
                           for i in self.ids}
        if image_id in self._masks:
            return self._masks[image_id]
        for d in _MASK_DIRS:  # an id outside the split (e.g. via subset of another split)
            if (self.root / d / f"{image_id}.png").is_file():
                return self.root / d / f"{image_id}.png"
        return None

    def load_image(self, image_id: str) -> np.ndarray:
        """(H, W, 3) uint8 RGB, C-contiguous and writable."""
        return read_rgb(self.image_path(image_id))

    def load_mask(self, image_id: str) -> np.ndarray | None:
        """(H, W) uint8 class ids with 255 = ignore, or None when the image has no mask."""
        path = self.mask_path(image_id)
        return None if path is None else read_label_png(path)

    @property
    def has_masks(self) -> bool:
        """True when every id of the split has a mask PNG."""
        return all(self.mask_path(i) is not None for i in self.ids)

    # -- image-level labels

    def image_labels(self, image_id: str) -> np.ndarray:
        """Sorted int64 foreground class ids of the image (never 0 or 255)."""
        self.image_path(image_id)  # an unknown id is one clear line, not a KeyError
        if image_id not in self._labels:
            self._labels[image_id] = self._read_labels(image_id)
        return self._labels[image_id].copy()

    def _cls_table(self) -> dict[str, np.ndarray]:
        if self._cls_labels is None:
            assert self.cls_labels_file is not None
            self._cls_labels = load_cls_labels(self.cls_labels_file, self.class_names)
        return self._cls_labels

    def _read_labels(self, image_id: str) -> np.ndarray:
        src = self.label_source
        if src in ("cls_labels", "auto") and self.cls_labels_file is not None:
            table = self._cls_table()
            if image_id in table:
                return (np.flatnonzero(table[image_id] > 0.5) + 1).astype(np.int64)
            if src == "cls_labels":
                raise WeakTrError(
                    f"image {image_id} is not in {self.cls_labels_file}",
                    hint="use label_source 'masks' or 'xml', or regenerate the labels file",
                )
        if src in ("masks", "auto"):
            path = self.mask_path(image_id)
            if path is not None:
                return labels_from_mask(read_label_png(path), path, self.num_classes)
            if src == "masks":
                raise WeakTrError(
                    f"image {image_id} has no mask in {self.root}/{{{','.join(_MASK_DIRS)}}}",
                    hint="use label_source 'xml' or 'cls_labels'",
                )
        xml = self.root / "Annotations" / f"{image_id}.xml"
        if xml.is_file():
            return labels_from_xml(xml, self.class_names)
        if src == "xml":
            raise WeakTrError(
                f"image {image_id} has no annotation {xml}",
                hint="use label_source 'masks' or 'cls_labels'",
            )
        raise WeakTrError(
            f"no image-level labels for {image_id}: no cls_labels entry, no mask, no "
            "Annotations XML",
            hint="add cls_labels.json, SegmentationClass masks or Annotations XML files",
        )


# ----------------------------------------------------------------------------- check


def _first(ids: list[str], what: str, list_name: str) -> str:
    return f"{len(ids)} ids of {list_name} have {what} (first: {ids[0]})"


def check_voc_layout(root: str | Path) -> list[str]:
    """Human-readable problems of a VOC-layout dataset; an empty list means it looks fine."""
    problems: list[str] = survey_voc_layout(root)["problems"]
    return problems


def survey_voc_layout(root: str | Path) -> dict[str, Any]:
    """Problems, notes and per-split counts of a VOC-layout dataset.

    Checks: the folders, weaktr_dataset.json, the train/val lists, and for every list file of
    ImageSets/Segmentation the ids without image, without any image-level label source, and
    splits where only some ids have a mask. Pixel masks are optional (a split without any is a
    note: evaluation and ground-truth panels skip it). Reads no pixels, so it is fast on the
    full 17k-image VOC. Returns {"problems": [...], "notes": [...], "splits": {name: {"images",
    "masks", "labels": {"cls_labels", "masks", "xml"}}}, "cls_labels_file"}.
    """
    try:
        data = resolve_voc_root(root)
    except WeakTrError as exc:
        return {"problems": [exc.message], "notes": [], "splits": {}, "cls_labels_file": None}
    problems: list[str] = []
    notes: list[str] = []
    class_names = VOC_CLASSES
    try:
        info = read_dataset_info(data)
        if info:
            class_names = info[1]
    except WeakTrError as exc:
        problems.append(exc.message)
    seg = data / "ImageSets" / "Segmentation"
    for split in ("train", "val"):
        if not (seg / f"{split}.txt").is_file():
            problems.append(f"missing ImageSets/Segmentation/{split}.txt")

    cls_table: dict[str, np.ndarray] = {}
    cls_file = find_cls_labels(data)
    if cls_file is not None:
        try:
            cls_table = load_cls_labels(cls_file, class_names)
        except WeakTrError as exc:
            problems.append(str(exc))  # with its hint: the conversion of a pickled .npy
    images = _index_folder(data / "JPEGImages", _IMAGE_SUFFIXES)
    masks: dict[str, str] = {}
    for d in reversed(_MASK_DIRS):  # Aug last so it wins, as in VocDataset
        masks.update(_index_folder(data / d, (".png",)))
    xmls = _index_folder(data / "Annotations", (".xml",))

    splits: dict[str, Any] = {}
    for split in available_splits(data):
        list_name = f"{split}.txt"
        try:
            ids = read_list_file(seg / list_name)
        except WeakTrError as exc:
            problems.append(exc.message)
            continue
        no_image = [i for i in ids if i not in images]
        if no_image:
            problems.append(_first(no_image, "no image", list_name))
        no_mask = [i for i in ids if i not in masks]
        if no_mask and len(no_mask) == len(ids):
            notes.append(f"{list_name}: no pixel masks (optional; evaluation and ground-truth "
                         "panels skip this split)")
        elif no_mask and split != "test":  # the VOC test set ships without masks by design
            aug = "" if (data / "SegmentationClassAug").is_dir() else "; no SegmentationClassAug/"
            problems.append(_first(no_mask, "no mask", list_name) + aug)
        no_label = [i for i in ids if i not in cls_table and i not in masks and i not in xmls]
        if no_label:
            problems.append(_first(no_label, "no image-level labels", list_name))
        # Per image, the source `VocDataset(label_source="auto")` reads labels from.
        from_cls = sum(i in cls_table for i in ids)
        from_masks = sum(i not in cls_table and i in masks for i in ids)
        splits[split] = {"images": len(ids) - len(no_image), "masks": len(ids) - len(no_mask),
                         "labels": {"cls_labels": from_cls, "masks": from_masks,
                                    "xml": sum(i not in cls_table and i not in masks
                                               and i in xmls for i in ids)}}
    return {"problems": problems, "notes": notes, "splits": splits,
            "cls_labels_file": str(cls_file) if cls_file else None}
