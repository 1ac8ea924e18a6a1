"""VOC-layout loader and image helpers: real VOC samples plus tiny synthetic layouts."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weaktr_cli.data.images import (
    read_label_png,
    read_rgb,
    voc_palette,
    write_label_png,
    write_rgb,
)
from weaktr_cli.data.voc import (
    VOC_CLASSES,
    VocDataset,
    check_voc_layout,
    load_cls_labels,
    write_dataset_info,
)
from weaktr_cli.errors import WeakTrError

VAL_IDS = ["2007_000033", "2007_004189", "2007_006449", "2008_002536", "2010_005582"]
# Image-level labels of the samples as VOC class ids (checked by hand against the masks).
EXPECTED_LABELS = {
    "2007_000032": [1, 15],  # aeroplane, person
    "2007_000033": [1],
    "2007_004189": [12],  # dog
    "2007_006449": [2],  # bicycle
    "2008_002536": [12, 17],  # dog, sheep
    "2010_005582": [5, 15],  # bottle, person
}


@pytest.fixture
def voc_base(voc_sample: Path) -> Path:
    """The folder that holds conftest's `voc_sample` (VOC2012/) and the cls_labels files: a
    dataset root in the form most of these tests read."""
    return voc_sample.parent


def make_voc(
    base: Path,
    splits: dict[str, list[str]] | None = None,
    n_classes: int = 21,
    image_ext: str = ".png",
) -> Path:
    """A tiny synthetic VOC2012 folder under `base`; returns the dataset folder."""
    splits = splits or {"train": ["a1", "a2"], "val": ["b1"]}
    data = base / "VOC2012"
    ids = sorted({i for lst in splits.values() for i in lst})
    rng = np.random.default_rng(0)
    for k, image_id in enumerate(ids):
        img = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        write_rgb(data / "JPEGImages" / f"{image_id}{image_ext}", img)
        label = np.zeros((6, 8), dtype=np.uint8)
        label[2:5, 2:6] = 1 + k % (n_classes - 1)
        label[1, :] = 255
        write_label_png(data / "SegmentationClass" / f"{image_id}.png", label)
    seg = data / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    for name, lst in splits.items():
        (seg / f"{name}.txt").write_text("".join(f"{i}\n" for i in lst))
    return data


def save_cls_labels(path: Path, table: dict[str, np.ndarray]) -> None:
    """Write cls_labels.json as {id: multi-hot list} (the file weaktr reads)."""
    path.write_text(json.dumps({k: np.asarray(v).tolist() for k, v in table.items()}))


def save_pickled_cls_labels(path: Path, table: object) -> None:
    """Write a community-style cls_labels.npy (np.save of a dict = a pickled 0-d object array)."""
    holder = np.empty((), dtype=object)
    holder[()] = table
    np.save(path, holder, allow_pickle=True)


# ----------------------------------------------------------------------------- real samples


@pytest.mark.shared_data
def test_splits_and_root_forms(voc_base: Path) -> None:
    assert VocDataset(voc_base, "train").ids == ["2007_000032"]
    assert VocDataset(voc_base, "val").ids == VAL_IDS
    trainval = VocDataset(voc_base / "VOC2012", "trainval")
    assert trainval.ids == ["2007_000032", *VAL_IDS]
    assert trainval.root == voc_base / "VOC2012"
    assert trainval.class_names == VOC_CLASSES and trainval.num_classes == 21
    assert trainval.name == "voc"


@pytest.mark.shared_data
@pytest.mark.parametrize("source", ["auto", "masks", "cls_labels"])
def test_label_sources_agree(voc_base: Path, source: str) -> None:
    ds = VocDataset(voc_base, "trainval", label_source=source)
    got = {i: ds.image_labels(i).tolist() for i in ds.ids}
    assert got == EXPECTED_LABELS
    assert ds.image_labels("2007_000032").dtype == np.int64
    vec = ds.label_vector("2008_002536")
    assert vec.shape == (20,) and vec.dtype == np.float32 and set(np.flatnonzero(vec)) == {11, 16}


@pytest.mark.shared_data
def test_cls_labels_npy_refused_and_its_conversion_matches_json(
    voc_base: Path, tmp_path: Path
) -> None:
    from weaktr_cli.data.image_labels import CLS_LABELS_CONVERSION

    with pytest.raises(WeakTrError, match="is a pickled dict; weaktr never unpickles") as info:
        load_cls_labels(voc_base / "cls_labels.npy", VOC_CLASSES)
    assert info.value.hint == CLS_LABELS_CONVERSION
    # The hint's one-liner, run by a user who trusts the community file, gives the JSON we read.
    (tmp_path / "cls_labels.npy").symlink_to(voc_base / "cls_labels.npy")
    command = CLS_LABELS_CONVERSION.split("python -c ", 1)[1].strip()
    subprocess.run(f"{shlex.quote(sys.executable)} -c {command}", shell=True, cwd=tmp_path,
                   check=True)
    converted = load_cls_labels(tmp_path / "cls_labels.json", VOC_CLASSES)
    js = load_cls_labels(voc_base / "cls_labels.json", VOC_CLASSES)
    masks = VocDataset(voc_base, "trainval", label_source="masks")
    assert sorted(converted) == sorted(js) == sorted(EXPECTED_LABELS)
    for image_id in masks.ids:
        np.testing.assert_array_equal(converted[image_id], js[image_id])
        np.testing.assert_array_equal(js[image_id], masks.label_vector(image_id))


class _RunsCode:
    """Unpickling this calls os.system: what a crafted cls_labels.npy does to np.load(pickle)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_crafted_cls_labels_npy_runs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    """14.2: a hostile cls_labels.npy, in the dataset folder or one up, is refused unread."""
    from tests.cli_helpers import run_cli

    data = make_voc(tmp_path / "parent")
    marker = tmp_path / "pwned"
    for where in (data, data.parent):
        save_pickled_cls_labels(where / "cls_labels.npy", {"a1": _RunsCode(marker)})
        result = run_cli(capsys, "data", "check", "--data", "voc", "--data-root", data)
        assert result.code == 1 and not marker.exists()
        assert "is a pickled dict; weaktr never unpickles" in result.stderr
        assert "cls_labels.json" in result.stderr and "Traceback" not in result.stderr
        with pytest.raises(WeakTrError, match="pickled dict"):
            VocDataset(data, "train").image_labels("a1")
        assert not marker.exists()
        (where / "cls_labels.npy").unlink()
    # A converted JSON next to the .npy is the file read; the .npy is never opened.
    save_pickled_cls_labels(data / "cls_labels.npy", {"a1": _RunsCode(marker)})
    save_cls_labels(data / "cls_labels.json", {"a1": np.eye(20, dtype=np.float32)[6]})
    ds = VocDataset(data, "train")
    assert ds.cls_labels_file == data / "cls_labels.json" and ds.image_labels("a1").tolist() == [7]
    assert not marker.exists()


def test_cls_labels_npy_plain_array_and_corrupt(tmp_path: Path) -> None:
    np.save(tmp_path / "cls_labels.npy", np.zeros((3, 20), np.float32))
    with pytest.raises(WeakTrError, match="plain array without image ids"):
        load_cls_labels(tmp_path / "cls_labels.npy", VOC_CLASSES)
    (tmp_path / "cls_labels.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(WeakTrError, match="cannot read image-level labels"):
        load_cls_labels(tmp_path / "cls_labels.npy", VOC_CLASSES)


@pytest.mark.parametrize("payload, message", [
    ([1, 2], "is not a dict"),
    ({"classes": 5, "multi_hot": {}}, "'classes' is not a list"),
    ({"multi_hot": [1]}, "'multi_hot' is not a dict"),
    ({"a1": "cat"}, "not a list of 0/1 numbers"),
    ({"a1": [None] * 20}, "not a list of 0/1 numbers"),
    ({"labels": {"a1": "cat"}}, "not a list of class names"),
    ({"labels": {"a1": [3]}}, "has label 3, not a class"),
    ({"labels": []}, "'labels' is not a dict"),
])
def test_cls_labels_json_malformed(tmp_path: Path, payload: object, message: str) -> None:
    (tmp_path / "cls_labels.json").write_text(json.dumps(payload))
    with pytest.raises(WeakTrError, match=message):
        load_cls_labels(tmp_path / "cls_labels.json", VOC_CLASSES)


def test_unknown_id_is_one_line(tmp_path: Path) -> None:
    ds = VocDataset(make_voc(tmp_path), "train")
    for read in (ds.load_image, ds.image_labels, ds.image_path):
        with pytest.raises(WeakTrError, match=r"no image 'nope' in voc/train") as info:
            read("nope")
        assert info.value.hint == "ids look like a1, a2"


@pytest.mark.shared_data
def test_cls_labels_json_found_when_alone(voc_base: Path, tmp_path: Path) -> None:
    # Links, not copies: a layout whose only labels file is cls_labels.json (in the parent).
    data = tmp_path / "VOC2012"
    data.mkdir()
    for sub in ("JPEGImages", "ImageSets"):
        (data / sub).symlink_to(voc_base / "VOC2012" / sub)
    (tmp_path / "cls_labels.json").symlink_to(voc_base / "cls_labels.json")
    ds = VocDataset(tmp_path, "trainval")
    assert ds.cls_labels_file == tmp_path / "cls_labels.json"
    assert {i: ds.image_labels(i).tolist() for i in ds.ids} == EXPECTED_LABELS
    assert not ds.has_masks and ds.load_mask("2007_000032") is None


@pytest.mark.shared_data
def test_xml_labels(voc_base: Path) -> None:
    ds = VocDataset(voc_base, "train", label_source="xml")
    assert ds.image_labels("2007_000032").tolist() == [1, 15]


@pytest.mark.shared_data
def test_images_and_masks(voc_base: Path) -> None:
    ds = VocDataset(voc_base, "trainval")
    assert ds.has_masks
    for image_id in ds.ids:
        img = ds.load_image(image_id)
        mask = ds.load_mask(image_id)
        assert mask is not None
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.flags.c_contiguous and img.flags.writeable
        assert mask.dtype == np.uint8 and mask.shape == img.shape[:2] and mask.flags.writeable
        values = set(np.unique(mask).tolist())
        assert 255 in values and 0 in values  # void borders and background
        assert values - {0, 255} == set(EXPECTED_LABELS[image_id])
        # Borders are thin: ignore pixels are a small fraction of the image.
        assert 0 < (mask == 255).mean() < 0.2
    with Image.open(ds.image_path("2007_000032")) as pil:
        assert ds.load_image("2007_000032").shape[:2] == (pil.height, pil.width)


@pytest.mark.shared_data
def test_deeplab_style_list_file(voc_base: Path, tmp_path: Path) -> None:
    lst = tmp_path / "my_list.txt"
    lst.write_text(
        "/JPEGImages/2008_002536.jpg /SegmentationClassAug/2008_002536.png\n\n"
        "/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n"
    )
    ds = VocDataset(voc_base, str(lst))
    assert ds.ids == ["2008_002536", "2007_000032"]
    assert ds.list_file == lst
    assert ds.image_labels("2008_002536").tolist() == [12, 17]


@pytest.mark.shared_data
def test_check_layout_real_sample(voc_base: Path) -> None:
    assert check_voc_layout(voc_base) == []


@pytest.mark.shared_data
def test_palette_matches_real_masks(voc_base: Path) -> None:
    with Image.open(voc_base / "VOC2012" / "SegmentationClass" / "2007_000032.png") as pil:
        pal = pil.getpalette()
    assert pal is not None and voc_palette()[: len(pal)] == pal


# ----------------------------------------------------------------------------- synthetic layouts


def test_root_forms_synthetic(tmp_path: Path) -> None:
    data = make_voc(tmp_path / "VOCdevkit")
    for root in (data, tmp_path / "VOCdevkit", tmp_path):
        assert VocDataset(root, "train").root == data


def test_png_images_and_other_split_names(tmp_path: Path) -> None:
    data = make_voc(tmp_path, {"train": ["a1", "a2"], "val": ["b1"], "mini": ["b1", "a1"]})
    ds = VocDataset(data, "mini")
    assert ds.ids == ["b1", "a1"]
    img = ds.load_image("a1")
    assert img.shape == (6, 8, 3) and ds.image_path("a1").suffix == ".png"


@pytest.mark.parametrize("fname", ["train_aug.txt", "trainaug.txt"])
def test_train_aug_prefers_aug_masks(tmp_path: Path, fname: str) -> None:
    data = make_voc(tmp_path)
    (data / "ImageSets" / "Segmentation" / fname).write_text("a1\na2\nb1\n")
    aug = np.full((6, 8), 3, dtype=np.uint8)
    write_label_png(data / "SegmentationClassAug" / "a1.png", aug)
    ds = VocDataset(data, "train_aug", label_source="masks")
    assert ds.ids == ["a1", "a2", "b1"]
    assert ds.mask_path("a1") == data / "SegmentationClassAug" / "a1.png"
    assert ds.mask_path("a2") == data / "SegmentationClass" / "a2.png"
    np.testing.assert_array_equal(ds.load_mask("a1"), aug)
    assert ds.image_labels("a1").tolist() == [3]
    assert ds.has_masks


def test_dataset_json_overrides_names(tmp_path: Path) -> None:
    data = make_voc(tmp_path, n_classes=3)
    write_dataset_info(data, "shapes", ["background", "circle", "square"])
    ds = VocDataset(data, "train")
    assert ds.name == "shapes"
    assert ds.class_names == ("background", "circle", "square") and ds.num_classes == 3
    assert ds.image_labels("a1").tolist() == [1] and ds.image_labels("a2").tolist() == [2]
    assert ds.label_vector("a2").tolist() == [0.0, 1.0]
    assert ds.foreground_ids.tolist() == [1, 2]


def test_dataset_json_validation(tmp_path: Path) -> None:
    data = make_voc(tmp_path)
    (data / "weaktr_dataset.json").write_text(json.dumps({"name": "x", "class_names": ["cat"]}))
    with pytest.raises(WeakTrError, match="must start with 'background'"):
        VocDataset(data, "train")
    with pytest.raises(WeakTrError, match="repeated class names"):
        write_dataset_info(tmp_path / "other", "x", ["background", "a", "a"])
    assert not (tmp_path / "other" / "weaktr_dataset.json").exists()


def test_xml_unknown_name_and_parts(tmp_path: Path) -> None:
    data = make_voc(tmp_path)
    ann = data / "Annotations"
    ann.mkdir()
    # A person-layout part name ("hand") is not an object and must not be read as a class.
    (ann / "a1.xml").write_text(
        "<annotation><object><name>person</name><part><name>hand</name></part></object>"
        "<object><name> dog </name></object></annotation>"
    )
    (ann / "a2.xml").write_text("<annotation><object><name>unicorn</name></object></annotation>")
    ds = VocDataset(data, "train", label_source="xml")
    assert ds.image_labels("a1").tolist() == [12, 15]
    with pytest.raises(WeakTrError, match="'unicorn' is not a class"):
        ds.image_labels("a2")


def test_auto_falls_back_per_image(tmp_path: Path) -> None:
    data = make_voc(tmp_path)
    table = {"a1": np.eye(20, dtype=np.float32)[6]}  # car, although the mask says aeroplane
    save_cls_labels(data / "cls_labels.json", table)
    ds = VocDataset(data, "train")
    assert ds.image_labels("a1").tolist() == [7]  # from cls_labels
    assert ds.image_labels("a2").tolist() == [2]  # not in the file: from the mask
    with pytest.raises(WeakTrError, match="a2 is not in"):
        VocDataset(data, "train", label_source="cls_labels").image_labels("a2")


# ----------------------------------------------------------------------------- errors


def test_error_root_missing(tmp_path: Path) -> None:
    with pytest.raises(WeakTrError, match="does not exist"):
        VocDataset(tmp_path / "nope", "train")


def test_error_no_jpegimages(tmp_path: Path) -> None:
    (tmp_path / "VOC2012").mkdir()
    with pytest.raises(WeakTrError) as info:
        VocDataset(tmp_path, "train")
    assert "no JPEGImages folder" in info.value.message
    assert str(tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages") in info.value.message
    assert info.value.hint is not None and "VOC2012/{JPEGImages" in info.value.hint


def test_error_split_missing_lists_existing(tmp_path: Path) -> None:
    data = make_voc(tmp_path)
    with pytest.raises(WeakTrError) as info:
        VocDataset(data, "train_aug")
    assert "no list file for split 'train_aug'" in info.value.message
    assert info.value.hint is not None and "train, val" in info.value.hint
    with pytest.raises(WeakTrError, match="not found"):
        VocDataset(data, str(tmp_path / "missing.txt"))


def test_error_id_without_image(tmp_path: Path) -> None:
    data = make_voc(tmp_path, {"train": ["a1", "ghost", "ghost2"], "val": ["b1"]})
    (data / "JPEGImages" / "ghost.png").unlink()
    (data / "JPEGImages" / "ghost2.png").unlink()
    with pytest.raises(WeakTrError, match=r"2 ids of train.txt have no image .*first: ghost\)"):
        VocDataset(data, "train")


def test_error_duplicate_id(tmp_path: Path) -> None:
    data = make_voc(tmp_path, {"train": ["a1"], "val": ["b1"], "dup": ["a1"]})
    (data / "ImageSets" / "Segmentation" / "dup.txt").write_text("a1\na1\n")
    with pytest.raises(WeakTrError, match="repeats id a1"):
        VocDataset(data, "dup")


def test_error_label_vector_length(tmp_path: Path) -> None:
    data = make_voc(tmp_path, n_classes=3)
    write_dataset_info(data, "shapes", ["background", "circle", "square"])
    save_cls_labels(data / "cls_labels.json", {"a1": np.zeros(20, np.float32)})
    with pytest.raises(WeakTrError, match="has 20 entries, the dataset has 2") as info:
        VocDataset(data, "train").image_labels("a1")
    assert info.value.hint is not None and "class-count mismatch" in info.value.hint


def test_error_json_classes_mismatch(tmp_path: Path) -> None:
    data = make_voc(tmp_path)
    payload = {"classes": ["cat", "dog"], "multi_hot": {"a1": [1, 0]}}
    (data / "cls_labels.json").write_text(json.dumps(payload))
    with pytest.raises(WeakTrError, match="lists classes"):
        VocDataset(data, "train").image_labels("a1")


def test_error_no_label_source(tmp_path: Path) -> None:
    data = make_voc(tmp_path)
    (data / "SegmentationClass" / "a1.png").unlink()
    ds = VocDataset(data, "train")
    assert not ds.has_masks and ds.load_mask("a1") is None
    with pytest.raises(WeakTrError, match="no image-level labels for a1"):
        ds.image_labels("a1")
    with pytest.raises(WeakTrError, match="a1 has no mask"):
        VocDataset(data, "train", label_source="masks").image_labels("a1")
    with pytest.raises(WeakTrError, match=r"no cls_labels\.json in "):
        VocDataset(data, "train", label_source="cls_labels")
    with pytest.raises(WeakTrError, match="unknown label source"):
        VocDataset(data, "train", label_source="bbox")


def test_error_mask_class_out_of_range(tmp_path: Path) -> None:
    data = make_voc(tmp_path, n_classes=3)
    write_dataset_info(data, "shapes", ["background", "circle", "square"])
    write_label_png(data / "SegmentationClass" / "a1.png", np.full((6, 8), 7, np.uint8))
    with pytest.raises(WeakTrError, match="holds class id 7, the dataset has 3 classes"):
        VocDataset(data, "train").image_labels("a1")


def test_error_corrupt_and_truncated_image(tmp_path: Path) -> None:
    data = make_voc(tmp_path, image_ext=".jpg")
    (data / "JPEGImages" / "a1.jpg").write_bytes(b"this is not a jpeg")
    full = (data / "JPEGImages" / "a2.jpg").read_bytes()
    (data / "JPEGImages" / "a2.jpg").write_bytes(full[: len(full) // 2])
    ds = VocDataset(data, "train")
    with pytest.raises(WeakTrError, match=r"cannot read image .*a1\.jpg"):
        ds.load_image("a1")
    with pytest.raises(WeakTrError, match=r"cannot read image .*a2\.jpg"):
        ds.load_image("a2")


def test_check_layout_reports_problems(tmp_path: Path) -> None:
    data = make_voc(tmp_path, {"train": ["a1", "a2"], "train_aug": ["a1", "a2"]})
    (data / "JPEGImages" / "a2.png").unlink()
    (data / "SegmentationClass" / "a1.png").unlink()
    problems = check_voc_layout(tmp_path)
    assert "missing ImageSets/Segmentation/val.txt" in problems
    assert "1 ids of train.txt have no image (first: a2)" in problems
    assert "1 ids of train.txt have no mask (first: a1); no SegmentationClassAug/" in problems
    assert "1 ids of train_aug.txt have no image-level labels (first: a1)" in problems
    assert check_voc_layout(tmp_path / "nope") == [
        f"dataset folder {tmp_path / 'nope'} does not exist"
    ]


# ----------------------------------------------------------------------------- image helpers


def test_voc_palette_values() -> None:
    pal = voc_palette()
    assert len(pal) == 768
    assert pal[3:6] == [128, 0, 0] and pal[15 * 3 : 16 * 3] == [192, 128, 128]
    assert pal[255 * 3 :] == [224, 224, 192]
    assert len(voc_palette(21)) == 63


def test_label_png_roundtrip_and_modes(tmp_path: Path) -> None:
    label = np.arange(48, dtype=np.uint8).reshape(6, 8)
    label[0, 0] = 255
    write_label_png(tmp_path / "sub" / "p.png", label)
    with Image.open(tmp_path / "sub" / "p.png") as pil:
        assert pil.mode == "P"
    back = read_label_png(tmp_path / "sub" / "p.png")
    np.testing.assert_array_equal(back, label)
    assert back.flags.writeable
    Image.fromarray(label).save(tmp_path / "l.png")  # grey L-mode labels
    np.testing.assert_array_equal(read_label_png(tmp_path / "l.png"), label)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(WeakTrError, match="is a RGB image, not an index"):
        read_label_png(tmp_path / "rgb.png")
    Image.fromarray(np.full((4, 4), 300, np.uint16)).save(tmp_path / "wide.png")
    with pytest.raises(WeakTrError, match="values up to 300"):
        read_label_png(tmp_path / "wide.png")
    with pytest.raises(WeakTrError, match=r"cannot read image .*nothing\.png: file not found"):
        read_label_png(tmp_path / "nothing.png")


def test_rgb_roundtrip_and_exif_only_on_request(tmp_path: Path) -> None:
    img = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    write_rgb(tmp_path / "x.png", img)
    np.testing.assert_array_equal(read_rgb(tmp_path / "x.png"), img)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"; VOC tooling ignores it, datasets too
    Image.fromarray(img).save(tmp_path / "r.png", exif=exif)
    assert read_rgb(tmp_path / "r.png").shape == (5, 7, 3)
    turned = read_rgb(tmp_path / "r.png", exif_orientation=True)  # a user's photo folder
    np.testing.assert_array_equal(turned, np.rot90(img, k=-1))
    Image.fromarray(img[:, :, 0]).save(tmp_path / "grey.png")
    grey = read_rgb(tmp_path / "grey.png")
    assert grey.shape == (5, 7, 3) and (grey[:, :, 1] == img[:, :, 0]).all()


def test_sixteen_bit_png_is_scaled_not_white(tmp_path: Path) -> None:
    """14.7: a 16-bit grey PNG used to be clipped to an all-white image."""
    wide = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1365)  # 0 .. 64155
    Image.fromarray(wide).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    got = read_rgb(tmp_path / "g16.png")
    assert got.shape == (6, 8, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[:, :, 0], (wide >> 8).astype(np.uint8))
    assert got.min() == 0 and got.max() == 250
    # A TIFF under a .png name: Pillow reads by content, so 32-bit pixels can arrive here.
    Image.fromarray(np.full((4, 4), -5, np.int32)).save(tmp_path / "neg.png", format="TIFF")
    with pytest.raises(WeakTrError, match=r"pixels outside 0\.\.65535"):
        read_rgb(tmp_path / "neg.png")


def test_list_file_ids_cannot_walk_out_of_the_dataset(tmp_path: Path) -> None:
    """A traversal id in a list file is cut to its last component: never a path outside."""
    data = make_voc(tmp_path)
    secret = tmp_path / "secret.png"
    write_rgb(secret, np.zeros((2, 2, 3), np.uint8))
    (data / "ImageSets" / "Segmentation" / "evil.txt").write_text("../../secret\n")
    with pytest.raises(WeakTrError, match=r"1 ids of evil\.txt have no image .*first: secret"):
        VocDataset(data, "evil")
