"""COCO loader: real val2014 samples, hand-made RLE masks and tiny synthetic layouts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from weaktr_cli.data.coco import (
    COCO_CATEGORIES,
    COCO_CLASSES,
    CocoDataset,
    check_coco_layout,
    decode_rle,
    polygon_to_mask,
    rle_string_to_counts,
)
from weaktr_cli.data.images import write_label_png, write_rgb
from weaktr_cli.errors import WeakTrError


@pytest.fixture
def coco_dataset(coco_sample: Path) -> CocoDataset:
    """The real val2014 samples (conftest's `coco_sample` folder) with their person annotations."""
    annotations = coco_sample / "annotations" / "instances_val2014_person_sample.json"
    if not annotations.is_file():
        pytest.skip(f"real COCO annotations not found at {annotations}")
    return CocoDataset(coco_sample, "val", annotations=annotations)


# Independent encoders (written from the COCO format description, not from the module).
def encode_runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts: column-major runs, starting with a (maybe empty) 0-run."""
    runs: list[int] = []
    current, n = False, 0
    for v in mask.flatten(order="F").tolist():
        if v == current:
            n += 1
        else:
            runs.append(n)
            current, n = v, 1
    runs.append(n)
    return runs


def encode_string(runs: list[int]) -> str:
    """COCO compressed counts: deltas to the count two back (from the 4th), 5-bit LEB128-ish."""
    out = []
    for i, count in enumerate(runs):
        x = count - runs[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def write_coco(root: Path, images: list[dict[str, Any]], anns: list[dict[str, Any]]) -> Path:
    """A tiny synthetic COCO val2014 folder with black images (lossless PNGs)."""
    for img in images:
        black = np.zeros((img["height"], img["width"], 3), np.uint8)
        write_rgb(root / "val2014" / img["file_name"], black)
    cats = [{"id": i, "name": n, "supercategory": "x"} for i, n in COCO_CATEGORIES.items()]
    path = root / "annotations" / "instances_val2014.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


IMG: dict[str, Any] = {
    "id": 7,
    "file_name": "COCO_val2014_000000000007.png",
    "height": 10,
    "width": 12,
}


# ----------------------------------------------------------------------------- real samples


@pytest.mark.shared_data
def test_sample_ids_classes_labels(coco_dataset: CocoDataset) -> None:
    ds = coco_dataset
    assert ds.ids[0] == "COCO_val2014_000000000785" and len(ds) == 4
    assert ds.num_classes == 91 and ds.class_names[1] == "person" and ds.class_names[12] == ""
    assert sum(1 for n in ds.class_names[1:] if n) == 80
    assert len(ds.foreground_ids) == 90
    for image_id in ds.ids:
        assert ds.image_labels(image_id).tolist() == [1]
        vec = ds.label_vector(image_id)
        assert vec.shape == (90,) and vec[0] == 1.0 and vec.sum() == 1.0


@pytest.mark.shared_data
def test_polygon_area_matches_annotation(coco_dataset: CocoDataset) -> None:
    n = 0
    for image_id in coco_dataset.ids:
        h, w = coco_dataset.image_size(image_id)
        for obj in coco_dataset.objects(image_id):
            mask = np.zeros((h, w), bool)
            for poly in obj.segmentation:
                mask |= polygon_to_mask(poly, h, w)
            assert abs(int(mask.sum()) - obj.area) <= 0.03 * obj.area, (image_id, obj.area)
            n += 1
    assert n == 14


@pytest.mark.shared_data
def test_sample_masks(coco_dataset: CocoDataset) -> None:
    assert coco_dataset.has_masks
    for image_id in coco_dataset.ids:
        img = coco_dataset.load_image(image_id)
        mask = coco_dataset.load_mask(image_id)
        assert img.dtype == np.uint8 and img.shape[2] == 3 and img.flags.writeable
        assert mask.dtype == np.uint8 and mask.shape == img.shape[:2]
        assert set(np.unique(mask).tolist()) == {0, 1}
        biggest = max(obj.area for obj in coco_dataset.objects(image_id))
        assert (mask == 1).sum() >= 0.97 * biggest


# ----------------------------------------------------------------------------- RLE and polygons


def hand_made_masks() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    a = np.zeros((7, 5), bool)
    a[1:4, 2] = True
    a[6, 4] = True
    b = np.ones((3, 4), bool)  # starts with a 1: first run is empty
    c = np.zeros((60, 50), bool)  # long runs: multi-group counts, negative deltas
    c[5:55, 3:40] = True
    c[20:22, 10:12] = False
    d = rng.random((13, 11)) > 0.6
    return [a, b, c, d, np.zeros((4, 4), bool)]


@pytest.mark.parametrize("k", range(5))
def test_rle_roundtrip(k: int) -> None:
    mask = hand_made_masks()[k]
    runs = encode_runs(mask)
    np.testing.assert_array_equal(decode_rle(runs, mask.shape), mask)
    s = encode_string(runs)
    assert rle_string_to_counts(s) == runs
    np.testing.assert_array_equal(decode_rle(s, list(mask.shape)), mask)
    np.testing.assert_array_equal(decode_rle(s.encode(), list(mask.shape)), mask)


def test_rle_errors() -> None:
    with pytest.raises(ValueError, match="covers 5 pixels"):
        decode_rle([2, 3], [2, 3])
    with pytest.raises(ValueError, match="ends inside a count"):
        rle_string_to_counts("o")  # 'o' - 48 = 0x3f: "more follows", then nothing


def test_polygon_pixel_centres() -> None:
    # Centres (x + 0.5, y + 0.5) inside [1, 5] x [1, 4]: columns 1..4, rows 1..3.
    mask = polygon_to_mask([1, 1, 5, 1, 5, 4, 1, 4], 6, 7)
    expected = np.zeros((6, 7), bool)
    expected[1:4, 1:5] = True
    np.testing.assert_array_equal(mask, expected)
    # Fractional edges: centres 1.5 and 2.5 lie in [0.7, 3.2], 0.5 and 3.5 do not.
    assert polygon_to_mask([0.7, 0, 3.2, 0, 3.2, 1, 0.7, 1], 1, 5).tolist() == [
        [False, True, True, False, False]
    ]
    # Partly outside the image: clipped, not wrapped.
    mask = polygon_to_mask([-3, -3, 3, -3, 3, 2, -3, 2], 4, 4)
    assert mask[:2, :3].all() and mask.sum() == 6
    assert not polygon_to_mask([0, 0, 3, 3], 4, 4).any()  # degenerate


# ----------------------------------------------------------------------------- synthetic layouts


def test_paint_order_and_crowd(tmp_path: Path) -> None:
    crowd = np.zeros((10, 12), bool)
    crowd[6:10, 0:12] = True
    anns = [
        # File order: small dog first; the larger car must not paint over it.
        {"id": 1, "image_id": 7, "category_id": 18, "iscrowd": 0, "area": 4.0,
         "segmentation": square(3, 3, 5, 5)},
        {"id": 2, "image_id": 7, "category_id": 3, "iscrowd": 0, "area": 36.0,
         "segmentation": square(1, 1, 7, 7)},
        {"id": 3, "image_id": 7, "category_id": 1, "iscrowd": 1, "area": 48.0,
         "segmentation": {"counts": encode_runs(crowd), "size": [10, 12]}},
        {"id": 4, "image_id": 7, "category_id": 44, "iscrowd": 0, "area": 2.0,
         "segmentation": {"counts": encode_string(encode_runs(_dot())), "size": [10, 12]}},
    ]  # fmt: skip
    write_coco(tmp_path, [IMG], anns)
    ds = CocoDataset(tmp_path, "val")
    assert ds.ids == ["COCO_val2014_000000000007"]
    assert ds.image_labels(ds.ids[0]).tolist() == [1, 3, 18, 44]  # crowd category included
    label = ds.load_mask(ds.ids[0])
    assert (label[3:5, 3:5] == 18).all()
    assert (label == 3).sum() == 36 - 4  # the car is painted first, the dog on top of it
    assert (label[6, 1:7] == 3).all()  # objects win over crowd; crowd only ignores background
    assert (label[6, 7:] == 255).all() and (label[7:] == 255).all()
    assert label[0, 11] == 44 and (label == 44).sum() == 2


def _dot() -> np.ndarray:
    m = np.zeros((10, 12), bool)
    m[0:2, 11] = True
    return m


def test_label_pngs_are_preferred(tmp_path: Path) -> None:
    write_coco(tmp_path, [IMG], [])
    png = np.full((10, 12), 5, np.uint8)
    write_label_png(
        tmp_path / "SegmentationClass" / "val2014" / "COCO_val2014_000000000007.png", png
    )
    ds = CocoDataset(tmp_path, "val2014")
    np.testing.assert_array_equal(ds.load_mask(ds.ids[0]), png)
    assert not ds.rasterize(ds.ids[0]).any() and ds.image_labels(ds.ids[0]).size == 0
    assert check_coco_layout(tmp_path) == [
        "missing train2014/ (the train images)",
        "missing annotations/instances_train2014.json",
    ]


def test_error_category_mismatch(tmp_path: Path) -> None:
    path = write_coco(tmp_path, [IMG], [])
    coco = json.loads(path.read_text())
    coco["categories"][0]["name"] = "human"
    path.write_text(json.dumps(coco))
    with pytest.raises(WeakTrError, match="category id 1 is 'human', COCO 2014 has 'person'"):
        CocoDataset(tmp_path, "val")
    assert any("category id 1 is 'human'" in p for p in check_coco_layout(tmp_path))


def test_error_missing_pieces(tmp_path: Path) -> None:
    with pytest.raises(WeakTrError, match="does not exist"):
        CocoDataset(tmp_path / "nope", "val")
    (tmp_path / "val2014").mkdir()
    with pytest.raises(WeakTrError) as info:
        CocoDataset(tmp_path, "val")
    assert "instances_val2014.json not found" in info.value.message
    with pytest.raises(WeakTrError, match="no image folder"):
        CocoDataset(tmp_path, "train")
    with pytest.raises(WeakTrError, match="unknown COCO split 'test'"):
        CocoDataset(tmp_path, "test")
    write_coco(tmp_path, [IMG, {**IMG, "id": 8, "file_name": "COCO_val2014_000000000008.jpg"}], [])
    (tmp_path / "val2014" / "COCO_val2014_000000000008.jpg").unlink()
    (tmp_path / "annotations" / "other.json").write_text("{}")
    with pytest.raises(WeakTrError, match=r"1 images of instances_val2014.json are missing"):
        CocoDataset(tmp_path, "val")
    with pytest.raises(WeakTrError) as info:
        CocoDataset(tmp_path, "val", annotations=tmp_path / "annotations" / "x.json")
    assert info.value.hint is not None and "instances_val2014.json, other.json" in info.value.hint


def test_error_bad_segmentation_and_corrupt_image(tmp_path: Path) -> None:
    bad = {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 1, "area": 1.0,
           "segmentation": {"counts": [3, 4], "size": [10, 12]}}  # fmt: skip
    write_coco(tmp_path, [IMG], [bad])
    (tmp_path / "val2014" / IMG["file_name"]).write_bytes(b"\x89PNG broken")
    ds = CocoDataset(tmp_path, "val")
    with pytest.raises(WeakTrError, match="bad segmentation for COCO_val2014_000000000007"):
        ds.load_mask(ds.ids[0])
    with pytest.raises(WeakTrError, match=r"cannot read image .*000000000007\.png"):
        ds.load_image(ds.ids[0])


def test_class_table() -> None:
    assert len(COCO_CATEGORIES) == 80 and len(COCO_CLASSES) == 91
    assert COCO_CLASSES[90] == "toothbrush" and COCO_CLASSES[67] == "dining table"
    assert [i for i in range(1, 91) if not COCO_CLASSES[i]] == [
        12,
        26,
        29,
        30,
        45,
        66,
        68,
        69,
        71,
        83,
    ]


# ----------------------------------------------------------------------------- hostile JSON

IMG8: dict[str, Any] = {**IMG, "id": 8, "file_name": "COCO_val2014_000000000008.png"}
ANN = {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "area": 4.0,
       "segmentation": square(1, 1, 3, 3)}  # fmt: skip


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["images"][0].update(width="abc"), r"image entry 0 has width 'abc', not an int"),
    (lambda c: c["images"][0].update(height=2.5), r"image entry 0 has height 2.5, not an integer"),
    (lambda c: c["images"][0].pop("file_name"), r"image entry 0 has no 'file_name'"),
    (lambda c: c["images"][0].update(width=0), r"image entry 0 .* has size 0x10"),
    (lambda c: c["images"][0].update(height=10**6, width=10**6), r"has size 1000000x1000000"),
    (lambda c: c["images"][0].update(file_name="../x.png"), r"file_name '../x.png', not a file"),
    (lambda c: c["images"].append(dict(c["images"][0])), r"image entry 1 .* repeats an earlier"),
    (lambda c: c["images"].append({**IMG8, "id": 7}), r"image entry 1 .* repeats an earlier"),
    (lambda c: c.update(images={}), r"has no list 'images'"),
    (lambda c: c.update(annotations=3), r"'annotations' is not a list"),
    (lambda c: c["annotations"][0].update(image_id="7"), r"annotation entry 0 has image_id '7'"),
    (lambda c: c["annotations"][0].update(segmentation=[["a", "b"]]), r"malformed area or seg"),
    (lambda c: c["annotations"][0].update(segmentation=[[1e999, 0, 1, 1, 2, 2]]), r"non-finite"),
    (lambda c: c["annotations"][0].update(area="big"), r"malformed area or segmentation"),
    (lambda c: c["categories"][0].update(id=None), r"category entry 0 has id None"),
])
def test_malformed_entries_are_one_line(tmp_path: Path, edit: Any, message: str) -> None:
    """17: a COCO width "abc" used to be "unexpected ValueError"; duplicates went unnoticed."""
    path = write_coco(tmp_path, [IMG, IMG8], [ANN])
    coco = json.loads(path.read_text())
    coco["images"] = coco["images"][:1]
    edit(coco)
    path.write_text(json.dumps(coco))
    with pytest.raises(WeakTrError, match=message):
        CocoDataset(tmp_path, "val")


def test_list_file_split(tmp_path: Path) -> None:
    """18.9: --split takes a list file for COCO too (the split is read off the file stems)."""
    write_coco(tmp_path, [IMG, IMG8], [ANN])
    listed = tmp_path / "one_val.txt"
    listed.write_text("COCO_val2014_000000000008\n")
    ds = CocoDataset(tmp_path, str(listed))
    assert ds.ids == ["COCO_val2014_000000000008"] and ds.split == str(listed)
    assert ds.image_size("COCO_val2014_000000000008") == (10, 12)
    from weaktr_cli.data import open_dataset

    assert open_dataset("coco", str(listed), tmp_path).ids == ds.ids
    listed.write_text("COCO_val2014_000000000009\n")
    with pytest.raises(WeakTrError, match=r"1 ids of .* are not in instances_val2014\.json"):
        CocoDataset(tmp_path, str(listed))
    listed.write_text("COCO_val2014_000000000008\nCOCO_train2014_000000000001\n")
    with pytest.raises(WeakTrError, match="mixes ids of train2014 and val2014"):
        CocoDataset(tmp_path, str(listed))
    listed.write_text("000000000008\n")
    with pytest.raises(WeakTrError, match="cannot tell the COCO split of id '000000000008'"):
        CocoDataset(tmp_path, str(listed))
    with pytest.raises(WeakTrError, match=r"split list file .*missing\.txt not found"):
        CocoDataset(tmp_path, str(tmp_path / "missing.txt"))


def test_unknown_id_is_one_line(tmp_path: Path) -> None:
    write_coco(tmp_path, [IMG], [ANN])
    ds = CocoDataset(tmp_path, "val")
    for read in (ds.load_image, ds.load_mask, ds.image_labels, ds.image_size):
        with pytest.raises(WeakTrError, match=r"no image 'nope' in coco/val"):
            read("nope")
