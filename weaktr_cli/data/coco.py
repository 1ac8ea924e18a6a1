"""MS COCO 2014 as a `SegmentationDataset`, read straight from the official annotation JSON.

Layout under `root`::

    train2014/COCO_train2014_<12 digits>.jpg    val2014/COCO_val2014_<12 digits>.jpg
    annotations/instances_train2014.json         annotations/instances_val2014.json
    SegmentationClass/{train2014,val2014}/<stem>.png   optional (the WSSS community label PNGs)

Class ids are the COCO category ids (1..90 with gaps, 91 ids with background 0; unused ids have
the name ""), so label maps and CAM channels use the same numbers as the JSON. Image ids are the
file stems (`COCO_val2014_000000000785`).

Label maps come from the community label PNGs when present, else they are rasterised from the
JSON (`weaktr_cli.data.coco_masks`, no pycocotools needed): polygons and RLE (compressed string
or uncompressed list), objects painted largest first so small objects stay visible on top,
then crowd regions set to 255 (ignore) where no individual object was painted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from weaktr_cli.data.base import IGNORE_INDEX, SegmentationDataset, unknown_id
from weaktr_cli.data.coco_masks import (  # noqa: F401  (their former home: still importable)
    decode_rle,
    polygon_to_mask,
    rle_string_to_counts,
    segmentation_to_mask,
)
from weaktr_cli.data.images import read_label_png, read_rgb
from weaktr_cli.errors import WeakTrError

#: The 80 COCO 2014/2017 categories at their official ids (ids 12, 26, 29, 30, 45, 66, 68, 69,
#: 71, 83 are unused).
COCO_CATEGORIES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse",
    20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe",
    27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee",
    35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket",
    44: "bottle", 46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon",
    51: "bowl", 52: "banana", 53: "apple", 54: "sandwich", 55: "orange", 56: "broccoli",
    57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair",
    63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet", 72: "tv",
    73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone",
    78: "microwave", 79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book",
    85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear", 89: "hair drier",
    90: "toothbrush",
}  # fmt: skip

#: class_names[i] names class id i: 91 entries, "background" at 0, "" for unused ids.
COCO_CLASSES: tuple[str, ...] = ("background", *(COCO_CATEGORIES.get(i, "") for i in range(1, 91)))

_SPLIT_RE = re.compile(r"^(train|val)(\d{4})?$")
_LAYOUT_HINT = (
    "expected ROOT/{train2014,val2014}/*.jpg and ROOT/annotations/instances_{train,val}2014.json"
)


# ----------------------------------------------------------------------------- dataset


class CocoObject(NamedTuple):
    """One annotation, reduced to what label maps need (polygons as float64 arrays)."""

    category_id: int
    iscrowd: bool
    area: float
    segmentation: Any  # list[np.ndarray] of polygons, or an RLE dict


def split_dir_name(split: str) -> str:
    """ "train" -> "train2014", "val" -> "val2014"; "val2017"-style names are kept."""
    match = _SPLIT_RE.match(split)
    if not match:
        raise WeakTrError(f"unknown COCO split '{split}'", hint="use 'train' or 'val'")
    return split if match.group(2) else f"{split}2014"


def _read_split_list(split: str) -> list[str] | None:
    """The ids of a list-file `split` (a path or a name ending in .txt), None for a split name."""
    from weaktr_cli.data.voc import is_list_file_path, read_list_file

    if not is_list_file_path(split):
        return None
    path = Path(split).expanduser()
    if not path.is_file():
        raise WeakTrError(f"split list file {path} not found",
                          hint="pass 'train', 'val' or an existing list file")
    return read_list_file(path)


_STEM_SPLIT_RE = re.compile(r"^COCO_((?:train|val)\d{4})_\d+$")


def _split_of_ids(ids: list[str], list_file: str) -> str:
    """The split ("val2014", ...) a list file's ids come from, read off their file stems."""
    splits = set()
    for image_id in ids:
        match = _STEM_SPLIT_RE.match(image_id)
        if not match:
            raise WeakTrError(
                f"cannot tell the COCO split of id {image_id!r} in {list_file}",
                hint="COCO list files hold file stems such as COCO_val2014_000000000785",
            )
        splits.add(match.group(1))
    if len(splits) > 1:
        raise WeakTrError(f"{list_file} mixes ids of {' and '.join(sorted(splits))}",
                          hint="one list file per split")
    return splits.pop()


def default_annotations(root: Path, split: str) -> Path:
    """ROOT/annotations/instances_<split>2014.json."""
    return root / "annotations" / f"instances_{split_dir_name(split)}.json"


def _compact_segmentation(seg: Any) -> Any:
    """RLE dicts as they are; polygons as float64 arrays (ValueError/TypeError when malformed)."""
    if isinstance(seg, dict):
        return seg
    if not isinstance(seg, list):
        raise ValueError(f"segmentation is a {type(seg).__name__}, not polygons or an RLE")
    # Arrays instead of lists of Python floats: ~4x less memory for the 600k train objects.
    polygons = [np.asarray(p, dtype=np.float64).reshape(-1) for p in seg]
    if any(not np.isfinite(p).all() for p in polygons):
        raise ValueError("a polygon has a non-finite coordinate")
    return polygons


_JSON_HINT = "expected a COCO instances JSON: {\"images\": [...], \"annotations\": [...], ...}"
# Beyond PIL's decompression-bomb limit a label map is a corrupt entry, not a photo.
_MAX_PIXELS = 2 * 89_478_485


def _entries(coco: dict[str, Any], key: str, path: Path) -> list[Any]:
    value = coco.get(key, [])
    if not isinstance(value, list):
        raise WeakTrError(f"{path}: {key!r} is not a list", hint=_JSON_HINT)
    return value


def _field(entry: Any, key: str, kind: type, path: Path, what: str, index: int) -> Any:
    """entry[key] as `kind` (int or str), or one line naming the entry and the bad value."""
    if not isinstance(entry, dict) or key not in entry:
        raise WeakTrError(f"{path}: {what} entry {index} has no {key!r}", hint=_JSON_HINT)
    value = entry[key]
    if kind is int:
        # Whole numbers only (COCO writes ids and sizes as integers; 480.0 is accepted too).
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise WeakTrError(f"{path}: {what} entry {index} has {key} {value!r}, not an integer",
                              hint=_JSON_HINT)
        return int(value)
    if not isinstance(value, str):
        raise WeakTrError(f"{path}: {what} entry {index} has {key} {value!r}, not a string",
                          hint=_JSON_HINT)
    return value


def _image_entry(img: Any, path: Path, index: int) -> tuple[int, int, int, str]:
    coco_id = _field(img, "id", int, path, "image", index)
    height = _field(img, "height", int, path, "image", index)
    width = _field(img, "width", int, path, "image", index)
    fname = _field(img, "file_name", str, path, "image", index)
    if height < 1 or width < 1 or height * width > _MAX_PIXELS:
        raise WeakTrError(f"{path}: image entry {index} ({fname}) has size {width}x{height}",
                          hint=_JSON_HINT)
    if Path(fname).name != fname or fname in ("", ".", ".."):
        # The file name is joined to the image folder: no folders, no "..".
        raise WeakTrError(f"{path}: image entry {index} has file_name {fname!r}, not a file name",
                          hint=_JSON_HINT)
    return coco_id, height, width, fname


def _object_entry(ann: Any, path: Path, index: int, by_coco_id: dict[int, str]
                  ) -> tuple[str, CocoObject]:
    cid = _field(ann, "category_id", int, path, "annotation", index)
    if cid not in COCO_CATEGORIES:
        raise WeakTrError(
            f"{path}: annotation {ann.get('id')} has unknown category id {cid}",
            hint="only the standard 80-category COCO annotation files are supported",
        )
    image_id = _field(ann, "image_id", int, path, "annotation", index)
    owner = by_coco_id.get(image_id)
    if owner is None:
        raise WeakTrError(
            f"{path}: annotation {ann.get('id')} refers to image id {image_id}, "
            "which the file does not list"
        )
    try:
        area = float(ann.get("area", 0.0))
        segmentation = _compact_segmentation(ann.get("segmentation", []))
    except (TypeError, ValueError) as exc:
        raise WeakTrError(f"{path}: annotation entry {index} has a malformed area or "
                          f"segmentation ({exc})", hint=_JSON_HINT) from exc
    return owner, CocoObject(cid, bool(ann.get("iscrowd", 0)), area, segmentation)


class CocoDataset(SegmentationDataset):
    """A split of COCO 2014 (train or val).

    Attributes beyond `SegmentationDataset`: `root`, `image_dir`, `annotations_file`,
    `label_dir` (the community label-PNG folder, whether it exists or not).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        annotations: str | Path | None = None,
        name: str = "coco",
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise WeakTrError(f"dataset folder {self.root} does not exist", hint=_LAYOUT_HINT)
        self.name = name
        self.split = split
        self.class_names = COCO_CLASSES
        listed = _read_split_list(split)
        dir_name = split_dir_name(split if listed is None else _split_of_ids(listed, split))
        self.image_dir = self.root / dir_name
        if not self.image_dir.is_dir():
            raise WeakTrError(f"no image folder {self.image_dir}", hint=_LAYOUT_HINT)
        self.label_dir = self.root / "SegmentationClass" / dir_name
        self.annotations_file = (
            Path(annotations).expanduser() if annotations
            else self.root / "annotations" / f"instances_{dir_name}.json"
        )
        self._load_annotations()
        if listed is not None:
            unknown = [i for i in listed if i not in self._info]
            if unknown:
                raise WeakTrError(
                    f"{len(unknown)} ids of {split} are not in {self.annotations_file.name} "
                    f"(first: {unknown[0]})",
                    hint="list file stems of the annotation file's images, one per line",
                )
            self.ids = listed
        self._label_pngs: dict[str, Path] | None = None

    def _load_annotations(self) -> None:
        path = self.annotations_file
        if not path.is_file():
            folder = path.parent
            found = sorted(p.name for p in folder.glob("*.json")) if folder.is_dir() else []
            raise WeakTrError(
                f"annotation file {path} not found",
                hint=f"JSON files in {folder}: {', '.join(found) if found else 'none'}; "
                "pass annotations=PATH to use another file",
            )
        try:
            with path.open("rb") as fh:
                coco = json.load(fh)
        except (OSError, ValueError, RecursionError) as exc:
            raise WeakTrError(f"cannot read COCO annotations {path}: {exc}") from exc
        if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
            raise WeakTrError(f"{path} has no list 'images'", hint=_JSON_HINT)
        for i, cat in enumerate(_entries(coco, "categories", path)):
            cid, cname = _field(cat, "id", int, path, "category", i), _field(
                cat, "name", str, path, "category", i)
            if COCO_CATEGORIES.get(cid) != cname:
                expected = COCO_CATEGORIES.get(cid, "no category")
                raise WeakTrError(
                    f"{path}: category id {cid} is '{cname}', COCO 2014 has {expected!r} there",
                    hint="only the standard 80-category COCO annotation files are supported",
                )
        self._info: dict[str, tuple[int, int, int, str]] = {}  # stem -> (coco id, h, w, file)
        by_coco_id: dict[int, str] = {}
        for i, img in enumerate(coco["images"]):
            coco_id, height, width, fname = _image_entry(img, path, i)
            stem = Path(fname).stem
            if stem in self._info or coco_id in by_coco_id:
                raise WeakTrError(
                    f"{path}: image entry {i} ({fname}, id {coco_id}) repeats an earlier image",
                    hint="each image must be listed once; remove the duplicate entry",
                )
            self._info[stem] = (coco_id, height, width, fname)
            by_coco_id[coco_id] = stem
        self.ids = list(self._info)
        self._objects: dict[str, list[CocoObject]] = {i: [] for i in self.ids}
        for i, ann in enumerate(_entries(coco, "annotations", path)):
            owner, obj = _object_entry(ann, path, i, by_coco_id)
            self._objects[owner].append(obj)
        present = {p.name for p in self.image_dir.iterdir()}
        missing = [i for i in self.ids if self._info[i][3] not in present]
        if missing:
            raise WeakTrError(
                f"{len(missing)} images of {path.name} are missing from {self.image_dir} "
                f"(first: {self._info[missing[0]][3]})",
                hint="download/extract the full image set, or pass a matching annotations file",
            )

    # -- accessors

    def image_path(self, image_id: str) -> Path:
        """Path of the JPEG of `image_id`."""
        return self.image_dir / self._entry(image_id)[3]

    def _entry(self, image_id: str) -> tuple[int, int, int, str]:
        try:
            return self._info[image_id]
        except KeyError:
            raise unknown_id(self, image_id) from None

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(height, width) as recorded in the annotation file."""
        _, h, w, _ = self._entry(image_id)
        return h, w

    def objects(self, image_id: str) -> list[CocoObject]:
        """The annotations of the image, in file order."""
        return list(self._objects[image_id])

    def load_image(self, image_id: str) -> np.ndarray:
        """(H, W, 3) uint8 RGB, C-contiguous and writable."""
        return read_rgb(self.image_path(image_id))

    def image_labels(self, image_id: str) -> np.ndarray:
        """Sorted int64 category ids of the image's annotations (crowd ones included)."""
        self._entry(image_id)
        cats = {obj.category_id for obj in self._objects[image_id]}
        return np.array(sorted(cats), dtype=np.int64)

    @property
    def has_masks(self) -> bool:
        """Always True: every image's label map can be rasterised from the annotations."""
        return True

    def label_png_path(self, image_id: str) -> Path | None:
        """SegmentationClass/<split>2014/<id>.png when that community label PNG exists."""
        if self._label_pngs is None:
            self._label_pngs = (
                {p.stem: p for p in self.label_dir.glob("*.png")} if self.label_dir.is_dir() else {}
            )
        return self._label_pngs.get(image_id)

    def load_mask(self, image_id: str) -> np.ndarray:
        """(H, W) uint8 category ids, 255 = ignore (crowd regions)."""
        png = self.label_png_path(image_id)
        if png is not None:
            return read_label_png(png)
        return self.rasterize(image_id)

    def rasterize(self, image_id: str) -> np.ndarray:
        """The label map built from the annotation JSON: (H, W) uint8, crowd = 255."""
        _, h, w, _ = self._entry(image_id)
        label = np.zeros((h, w), dtype=np.uint8)
        crowd = np.zeros((h, w), dtype=bool)
        objs = self._objects[image_id]
        # Stable sort: equal areas keep file order; large first so small objects end on top.
        for obj in sorted((o for o in objs if not o.iscrowd), key=lambda o: -o.area):
            label[self._object_mask(image_id, obj, h, w)] = obj.category_id
        for obj in objs:
            if obj.iscrowd:
                crowd |= self._object_mask(image_id, obj, h, w)
        label[crowd & (label == 0)] = IGNORE_INDEX
        return label

    def _object_mask(self, image_id: str, obj: CocoObject, h: int, w: int) -> np.ndarray:
        try:
            return segmentation_to_mask(obj.segmentation, h, w)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise WeakTrError(
                f"bad segmentation for {image_id} in {self.annotations_file}: {exc}"
            ) from exc


# ----------------------------------------------------------------------------- check


def check_coco_layout(root: str | Path) -> list[str]:
    """Human-readable problems of a COCO 2014 folder; an empty list means it looks fine."""
    problems: list[str] = survey_coco_layout(root)["problems"]
    return problems


def survey_coco_layout(root: str | Path) -> dict[str, Any]:
    """Problems and per-split image counts of a COCO 2014 folder.

    Parses each split's annotation JSON (tens of seconds on the full train2014 file) to find
    missing images, foreign categories and incomplete label-PNG folders. Returns {"problems":
    [...], "notes": [], "splits": {split: {"images", "masks"}}} (labels and masks both come
    from the instances JSON).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        return {"problems": [f"dataset folder {root} does not exist"], "notes": [], "splits": {}}
    problems: list[str] = []
    splits: dict[str, Any] = {}
    for split in ("train", "val"):
        dir_name = split_dir_name(split)
        ann = default_annotations(root, split)
        ok = True
        if not (root / dir_name).is_dir():
            problems.append(f"missing {dir_name}/ (the {split} images)")
            ok = False
        if not ann.is_file():
            problems.append(f"missing annotations/{ann.name}")
            ok = False
        if not ok:
            continue
        try:
            ds = CocoDataset(root, split)
        except WeakTrError as exc:
            problems.append(exc.message)
            continue
        splits[split] = {"images": len(ds.ids), "masks": len(ds.ids),
                         "labels": {"instances_json": len(ds.ids)}}
        if ds.label_dir.is_dir():
            no_png = [i for i in ds.ids if ds.label_png_path(i) is None]
            if no_png:
                problems.append(
                    f"{len(no_png)} images of {dir_name} have no label PNG in "
                    f"SegmentationClass/{dir_name} (first: {no_png[0]})"
                )
    return {"problems": problems, "notes": [], "splits": splits}
