"""Image-level labels of a VOC-layout dataset: `cls_labels.json` (never a pickled
`cls_labels.npy`), `Annotations/<id>.xml` object names, or the class ids a mask holds.
The formats are described in `weaktr_cli.data.voc`."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from weaktr_cli.data.base import IGNORE_INDEX
from weaktr_cli.errors import WeakTrError

CLS_LABEL_FILES = ("cls_labels.json", "cls_labels.npy")
#: What a user runs once, on a cls_labels.npy they trust, to get the cls_labels.json we read.
CLS_LABELS_CONVERSION = (
    "if you trust the file, convert it once: python -c \"import json, numpy as np; "
    "d = np.load('cls_labels.npy', allow_pickle=True).item(); "
    "json.dump({str(k): np.asarray(v).tolist() for k, v in d.items()}, "
    "open('cls_labels.json', 'w'))\""
)

def find_cls_labels(data_dir: Path) -> Path | None:
    """The first cls_labels.npy / cls_labels.json in the dataset folder, then its parent."""
    for folder in (data_dir, data_dir.parent):
        for fname in CLS_LABEL_FILES:
            if (folder / fname).is_file():
                return folder / fname
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise WeakTrError(f"cannot read image-level labels {path}: {exc}") from exc


def _read_npy_labels(path: Path) -> Any:
    """Refuse a pickled cls_labels.npy without unpickling it (np.load with pickle disabled).

    A plain numeric .npy cannot say which image a row belongs to, so no .npy is usable.
    """
    try:
        np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" not in str(exc):  # a broken file, not a pickled one
            raise WeakTrError(f"cannot read image-level labels {path}: {exc}") from exc
        raise WeakTrError(
            f"{path} is a pickled dict; weaktr never unpickles dataset files (they can run code)",
            hint=CLS_LABELS_CONVERSION,
        ) from None
    except (OSError, EOFError) as exc:
        raise WeakTrError(f"cannot read image-level labels {path}: {exc}") from exc
    raise WeakTrError(
        f"{path} is a plain array without image ids, not a table of image-level labels",
        hint="write cls_labels.json as {\"<image id>\": [0/1 per class], ...}",
    )


def load_cls_labels(path: Path, class_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """id -> float32 multi-hot vector of length len(class_names) - 1 (entry i = class id i+1)."""
    raw = _read_npy_labels(path) if path.suffix == ".npy" else _read_json(path)
    if not isinstance(raw, dict):
        raise WeakTrError(f"{path} is not a dict of image id -> labels", hint=_CLS_JSON_HINT)
    classes = raw.get("classes")
    if classes is not None:
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise WeakTrError(f"{path}: 'classes' is not a list of names", hint=_CLS_JSON_HINT)
        if classes != list(class_names[1:]):
            raise WeakTrError(
                f"{path} lists classes {classes[:5]}... ({len(classes)}), the dataset has "
                f"{list(class_names[1:6])}... ({len(class_names) - 1})",
                hint="the labels file was made for another dataset or class order",
            )
    if "labels" in raw and "multi_hot" not in raw:
        return _labels_by_name(path, raw["labels"], class_names)
    table = (
        raw["multi_hot"] if "multi_hot" in raw else {k: v for k, v in raw.items() if k != "classes"}
    )
    if not isinstance(table, dict):
        raise WeakTrError(f"{path}: 'multi_hot' is not a dict of image id -> vector",
                          hint=_CLS_JSON_HINT)
    return {str(key): _multi_hot(path, str(key), value, len(class_names) - 1)
            for key, value in table.items()}


_CLS_JSON_HINT = (
    'expected {"classes": [...], "multi_hot": {"<id>": [0, 1, ...]}} or '
    '{"classes": [...], "labels": {"<id>": ["cat", ...]}}'
)


def _multi_hot(path: Path, image_id: str, value: Any, n_fg: int) -> np.ndarray:
    numbers = isinstance(value, list) and all(
        isinstance(v, int | float) and np.isfinite(v) for v in value
    )
    if not numbers:
        raise WeakTrError(f"{path}: the label vector of {image_id} is not a list of 0/1 numbers",
                          hint=_CLS_JSON_HINT)
    if len(value) != n_fg:
        raise WeakTrError(
            f"{path}: label vector of {image_id} has {len(value)} entries, the dataset has "
            f"{n_fg} foreground classes",
            hint="class-count mismatch: the labels file was made for another dataset",
        )
    return np.asarray(value, dtype=np.float32)


def _labels_by_name(path: Path, labels: Any, class_names: tuple[str, ...]
                    ) -> dict[str, np.ndarray]:
    if not isinstance(labels, dict):
        raise WeakTrError(f"{path}: 'labels' is not a dict of image id -> class names",
                          hint=_CLS_JSON_HINT)
    index = {name: i for i, name in enumerate(class_names) if name}
    out: dict[str, np.ndarray] = {}
    for key, names in labels.items():
        if not isinstance(names, list):
            raise WeakTrError(f"{path}: the labels of image {key} are not a list of class names",
                              hint=_CLS_JSON_HINT)
        vec = np.zeros(len(class_names) - 1, dtype=np.float32)
        for name in names:
            if not isinstance(name, str) or index.get(name, 0) == 0:
                raise WeakTrError(
                    f"{path}: image {key} has label {name!r}, not a class of this dataset",
                    hint=f"classes: {', '.join(n for n in class_names[1:] if n)}",
                )
            vec[index[name] - 1] = 1.0
        out[str(key)] = vec
    return out


def labels_from_xml(path: Path, class_names: tuple[str, ...]) -> np.ndarray:
    index = {name: i for i, name in enumerate(class_names) if name}
    try:
        tree = ET.parse(path)
    except (OSError, ET.ParseError) as exc:
        raise WeakTrError(f"cannot read annotation {path}: {exc}") from exc
    ids: set[int] = set()
    # Only object/name: person-layout parts (<part><name>hand</name>) are not classes.
    for obj in tree.getroot().findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in index or index[name] == 0:
            raise WeakTrError(
                f"{path}: object name '{name}' is not a class of this dataset",
                hint=f"classes: {', '.join(n for n in class_names[1:] if n)}",
            )
        ids.add(index[name])
    return np.array(sorted(ids), dtype=np.int64)


def labels_from_mask(mask: np.ndarray, path: Path, num_classes: int) -> np.ndarray:
    present = np.unique(mask)
    present = present[(present != 0) & (present != IGNORE_INDEX)]
    if present.size and int(present.max()) >= num_classes:
        raise WeakTrError(
            f"mask {path} holds class id {int(present.max())}, the dataset has {num_classes} "
            "classes",
            hint="add the classes to weaktr_dataset.json or fix the mask",
        )
    return present.astype(np.int64)
