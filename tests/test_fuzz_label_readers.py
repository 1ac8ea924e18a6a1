"""Property-based fuzzing of the dataset label readers (issue 14): byte flips and truncations of
valid files never crash, never hang and never escape as anything but a `WeakTrError`.

Readers: cls_labels.json, weaktr_dataset.json, split list files, Annotations XML, label PNGs
(and the RGB reader on the same bytes), and COCO instances JSON through `CocoDataset` with
every label map rasterised. `WEAKTR_FUZZ_EXAMPLES` raises the examples per reader (default 150;
the count is per reader and per test).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests._time_limit import time_limit
from weaktr_cli.data.coco import COCO_CATEGORIES, CocoDataset
from weaktr_cli.data.images import read_label_png, read_rgb, write_label_png
from weaktr_cli.data.voc import (
    VOC_CLASSES,
    labels_from_xml,
    load_cls_labels,
    read_dataset_info,
    read_list_file,
)
from weaktr_cli.errors import WeakTrError

EXAMPLES = int(os.environ.get("WEAKTR_FUZZ_EXAMPLES", "150"))
HANG_SECONDS = 20  # per example; a valid one takes milliseconds
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def damaged(draw: st.DrawFn, valid: bytes) -> bytes:
    """`valid` with a few bytes XOR-ed, replaced or deleted, then maybe truncated."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(("xor", "byte", "delete")))
        if action == "xor":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif action == "byte":
            data[pos] = draw(st.integers(0, 255))
        else:
            del data[pos]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def _survives(read: Callable[[Path], object], name: str, data: bytes) -> None:
    """`read` on a file holding `data` returns or raises WeakTrError, within the time limit."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        with time_limit(HANG_SECONDS):
            try:
                read(path)
            except WeakTrError as exc:
                assert exc.message and "\n" not in exc.message.strip()


# ----------------------------------------------------------------------------- VOC side files

CLS_JSON = json.dumps({
    "classes": list(VOC_CLASSES[1:]),
    "multi_hot": {"2007_000032": [1.0] + [0.0] * 13 + [1.0] + [0.0] * 5,
                  "2007_000033": [1.0] + [0.0] * 19},
}).encode()
CLS_BY_NAME = json.dumps({"labels": {"a": ["cat", "dog"], "b": ["person"]}}).encode()
INFO_JSON = json.dumps({"name": "mine", "class_names": ["background", "cat", "dog"]}).encode()
LIST_FILE = b"2007_000032\n2007_000033\n/JPEGImages/2007_000039.jpg /SegmentationClass/x.png\n"
XML = (b"<annotation><filename>a.jpg</filename><object><name>dog</name><part><name>hand</name>"
       b"</part></object><object><name>person</name></object></annotation>")


@FUZZ
@given(damaged(CLS_JSON))
def test_cls_labels_json_multi_hot(data: bytes) -> None:
    _survives(lambda p: load_cls_labels(p, VOC_CLASSES), "cls_labels.json", data)


@FUZZ
@given(damaged(CLS_BY_NAME))
def test_cls_labels_json_by_name(data: bytes) -> None:
    _survives(lambda p: load_cls_labels(p, VOC_CLASSES), "cls_labels.json", data)


@FUZZ
@given(damaged(INFO_JSON))
def test_dataset_info_json(data: bytes) -> None:
    _survives(lambda p: read_dataset_info(p.parent), "weaktr_dataset.json", data)


@FUZZ
@given(damaged(LIST_FILE))
def test_split_list_file(data: bytes) -> None:
    _survives(read_list_file, "train.txt", data)


@FUZZ
@given(damaged(XML))
def test_annotation_xml(data: bytes) -> None:
    _survives(lambda p: labels_from_xml(p, VOC_CLASSES), "a.xml", data)


# ----------------------------------------------------------------------------- label PNGs


def _label_png() -> bytes:
    label = np.zeros((12, 16), np.uint8)
    label[2:9, 3:12] = 12
    label[0, :] = 255
    with tempfile.TemporaryDirectory() as tmp:
        write_label_png(Path(tmp) / "l.png", label)
        return (Path(tmp) / "l.png").read_bytes()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


LABEL_PNG = _label_png()
JPEG = _jpeg()


def _read_label(path: Path) -> None:
    label = read_label_png(path)
    assert label.dtype == np.uint8 and label.ndim == 2


def _read_image(path: Path) -> None:
    image = read_rgb(path, exif_orientation=True)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


@FUZZ
@given(damaged(LABEL_PNG))
def test_label_png(data: bytes) -> None:
    _survives(_read_label, "l.png", data)
    _survives(_read_image, "l.png", data)


@FUZZ
@given(damaged(JPEG))
def test_jpeg_image(data: bytes) -> None:
    _survives(_read_image, "a.jpg", data)


# ----------------------------------------------------------------------------- COCO JSON


def _coco_json() -> bytes:
    images = [{"id": 7, "file_name": "COCO_val2014_000000000007.png", "height": 10, "width": 12},
              {"id": 8, "file_name": "COCO_val2014_000000000008.png", "height": 6, "width": 5}]
    anns = [
        {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "area": 16.0,
         "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]},
        {"id": 2, "image_id": 7, "category_id": 18, "iscrowd": 1, "area": 6.0,
         "segmentation": {"counts": "n0370V2", "size": [10, 12]}},
        {"id": 3, "image_id": 8, "category_id": 3, "iscrowd": 0, "area": 4.0,
         "segmentation": {"counts": [2, 2, 4, 2, 20], "size": [6, 5]}},
    ]
    cats = [{"id": i, "name": n} for i, n in list(COCO_CATEGORIES.items())[:20]]
    return json.dumps({"images": images, "annotations": anns, "categories": cats}).encode()


COCO_JSON = _coco_json()


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    (root / "val2014").mkdir()
    (root / "annotations").mkdir()
    for name, (h, w) in (("COCO_val2014_000000000007.png", (10, 12)),
                         ("COCO_val2014_000000000008.png", (6, 5))):
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(root / "val2014" / name)
    return root


def test_coco_fixture_is_valid(coco_root: Path) -> None:
    """The undamaged file reads, so the fuzz below starts from a file that works."""
    (coco_root / "annotations" / "instances_val2014.json").write_bytes(COCO_JSON)
    ds = CocoDataset(coco_root, "val")
    assert ds.image_labels("COCO_val2014_000000000007").tolist() == [1, 18]
    assert (ds.load_mask("COCO_val2014_000000000007") == 1).sum() == 16
    assert (ds.load_mask("COCO_val2014_000000000008") == 3).sum() == 4


def _read_coco(root: Path) -> Callable[[Path], None]:
    def read(path: Path) -> None:
        target = root / "annotations" / "instances_val2014.json"
        target.write_bytes(path.read_bytes())
        ds = CocoDataset(root, "val")
        for image_id in ds.ids:
            ds.image_labels(image_id)
            mask = ds.load_mask(image_id)
            assert mask.shape == ds.image_size(image_id) and mask.dtype == np.uint8
    return read


@FUZZ
@given(data=damaged(COCO_JSON))
def test_coco_instances_json(coco_root: Path, data: bytes) -> None:
    _survives(_read_coco(coco_root), "instances.json", data)
