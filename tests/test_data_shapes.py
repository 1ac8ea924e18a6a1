"""The built-in synthetic `shapes` dataset: determinism, label/mask consistency, cache layout."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weaktr_cli.data import shapes
from weaktr_cli.data.base import IGNORE_INDEX
from weaktr_cli.data.shapes import (
    MAX_CLASSES,
    SHAPES,
    ShapesConfig,
    class_names,
    ensure_shapes,
    open_shapes,
    render_sample,
    render_scene,
)
from weaktr_cli.errors import WeakTrError


def _tiny() -> dict:
    return {"num_train": 20, "num_val": 6, "num_test": 5, "image_size": 48}


TINY = ShapesConfig(**_tiny())


def _scenes(config: ShapesConfig, split: str = "train") -> list[shapes.Scene]:
    return [render_scene(config, split, i) for i in range(config.split_size(split))]


# ----------------------------------------------------------------------------- config


def test_class_names_default_is_three_families_by_two_shapes() -> None:
    assert class_names(ShapesConfig()) == (
        "background",
        "red-circle",
        "red-square",
        "blue-circle",
        "blue-square",
        "green-circle",
        "green-square",
    )


@pytest.mark.parametrize("k", [1, 2, 3, 5, 6, 7, 12, 20, MAX_CLASSES])
def test_class_names_has_k_plus_one_unique_names(k: int) -> None:
    names = class_names(ShapesConfig(num_classes=k))
    assert len(names) == k + 1
    assert names[0] == "background"
    assert len(set(names)) == k + 1


def test_num_families_sets_the_grid() -> None:
    assert class_names(ShapesConfig(num_families=2))[1:] == (
        "red-circle",
        "red-square",
        "red-triangle",
        "blue-circle",
        "blue-square",
        "blue-triangle",
    )
    assert class_names(ShapesConfig(num_classes=4, num_families=4))[1:] == (
        "red-circle",
        "blue-circle",
        "green-circle",
        "yellow-circle",
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_families": 6},
        {"num_classes": 4, "num_families": 5},
        {"num_classes": 20, "num_families": 2},
        {"num_classes": 0},
        {"num_classes": MAX_CLASSES + 1},
        {"image_size": 8},
        {"min_size": 0.5, "max_size": 0.3},
        {"num_train": 0, "num_val": 0},
        {"num_test": -1},
        {"occlusion_prob": 1.5},
        {"seed": -1},
    ],
)
def test_bad_config_is_a_user_error(kwargs: dict) -> None:
    with pytest.raises(WeakTrError, match="invalid shapes setting"):
        ShapesConfig(**kwargs)


def test_fingerprint_follows_the_settings() -> None:
    assert ShapesConfig().fingerprint() == ShapesConfig().fingerprint()
    assert ShapesConfig(seed=1).fingerprint() != ShapesConfig().fingerprint()
    assert ShapesConfig(image_size=64).fingerprint() != ShapesConfig().fingerprint()
    assert len(ShapesConfig().fingerprint()) == 12


# ----------------------------------------------------------------------------- rendering


def test_render_is_deterministic_and_independent_of_dataset_size() -> None:
    img_a, mask_a = render_sample(TINY, "train", 7)
    img_b, mask_b = render_sample(TINY, "train", 7)
    bigger = ShapesConfig(num_train=200, num_val=50, num_test=0, image_size=48)
    img_c, mask_c = render_sample(bigger, "train", 7)
    assert np.array_equal(img_a, img_b) and np.array_equal(mask_a, mask_b)
    assert np.array_equal(img_a, img_c) and np.array_equal(mask_a, mask_c)
    # other seeds, indices and splits give other images
    assert not np.array_equal(img_a, render_sample(TINY, "train", 8)[0])
    assert not np.array_equal(img_a, render_sample(TINY, "val", 5)[0])
    assert not np.array_equal(img_a, render_sample(ShapesConfig(seed=1, **_tiny()), "train", 7)[0])


def test_render_matches_pinned_pixels() -> None:
    """Pixels are meant to be identical on every platform and numpy version; if this fails after
    an intended change to the generator, bump GENERATOR_VERSION and update the digest."""
    img, mask = render_sample(TINY, "train", 3)
    digest = hashlib.sha256(img.tobytes() + mask.tobytes()).hexdigest()[:16]
    assert digest == PINNED_DIGEST, f"generator output changed: {digest}"


PINNED_DIGEST = "1542e16d5ab2ea59"


def test_test_split_is_its_own_stream_and_leaves_train_and_val_unchanged() -> None:
    """The held-out split came later: adding it must not move a single train or val pixel."""
    without_test = ShapesConfig(**{**_tiny(), "num_test": 0})
    for split, index in (("train", 3), ("val", 2)):
        a, b = render_sample(TINY, split, index), render_sample(without_test, split, index)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    test_images = [render_sample(TINY, "test", i)[0] for i in range(TINY.num_test)]
    others = [render_sample(TINY, s, i)[0] for s in ("train", "val") for i in range(5)]
    assert not any(np.array_equal(t, o) for t in test_images for o in others)
    img, mask = render_sample(TINY, "test", 0)
    digest = hashlib.sha256(img.tobytes() + mask.tobytes()).hexdigest()[:16]
    assert digest == PINNED_TEST_DIGEST, f"test split output changed: {digest}"
    assert without_test.fingerprint() != TINY.fingerprint()


PINNED_TEST_DIGEST = "44ac410e660a62b3"


def test_samples_have_the_promised_structure() -> None:
    k = TINY.num_classes
    seen: set[int] = set()
    for scene in _scenes(TINY) + _scenes(TINY, "val") + _scenes(TINY, "test"):
        img, mask, inst = scene.image, scene.mask, scene.instances
        assert img.shape == (48, 48, 3) and img.dtype == np.uint8
        assert mask.shape == (48, 48) and mask.dtype == np.uint8
        assert 1 <= len(scene.objects) <= TINY.max_objects
        values = set(np.unique(mask).tolist())
        assert values <= set(range(k + 1)) | {IGNORE_INDEX}
        # image-level labels (what VocDataset derives from the mask) == the objects' classes
        labels = sorted(values - {0, IGNORE_INDEX})
        assert labels == sorted({o.class_id for o in scene.objects})
        # every labelled pixel is the class of the object on top there
        class_of = np.array([0] + [o.class_id for o in scene.objects])
        scored = mask != IGNORE_INDEX
        assert np.array_equal(mask[scored], class_of[inst[scored]])
        for j, obj in enumerate(scene.objects, start=1):
            kept = int(((inst == j) & scored).sum())
            assert kept >= TINY.min_visible * obj.area
            assert obj.visible == int((inst == j).sum())
        seen.update(labels)
    assert seen == set(range(1, k + 1)), "every class should appear in the tiny splits"


def test_ignore_band_is_one_pixel_outside_each_object() -> None:
    for scene in _scenes(TINY)[:10]:
        inst = np.pad(scene.instances, 1, constant_values=-1)
        centre = inst[1:-1, 1:-1]
        higher_neighbour = np.zeros(centre.shape, dtype=bool)
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            shifted = inst[1 + dy : inst.shape[0] - 1 + dy, 1 + dx : inst.shape[1] - 1 + dx]
            higher_neighbour |= shifted > centre
        assert np.array_equal(scene.mask == IGNORE_INDEX, higher_neighbour)
    no_band = ShapesConfig(ignore_border=0, **_tiny())
    assert all(not (s.mask == IGNORE_INDEX).any() for s in _scenes(no_band)[:10])


def test_objects_are_exact_hard_shapes() -> None:
    """Pixels inside an object carry exactly the object's colour field: no blending at edges."""
    cfg = ShapesConfig(pixel_noise=0, **_tiny())
    scene = render_scene(cfg, "train", 0)
    top = scene.instances == len(scene.objects)
    # The background never has object-like saturation; the top object always does.
    rgb = scene.image.astype(np.float64) / 255
    sat = (rgb.max(-1) - rgb.min(-1)) / np.maximum(rgb.max(-1), 1e-6)
    assert sat[top].min() > 0.45
    assert sat[scene.instances == 0].max() < 0.45


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_area_matches_its_equivalent_diameter(shape: str) -> None:
    d = 60.0
    m = shapes._rasterize(shape, (100.0, 100.0), d, (0.6, 0.8), 1.1, 200)
    assert abs(int(m.sum()) / (math.pi / 4 * d * d) - 1) < 0.02
    ys, xs = np.nonzero(m)
    assert xs.min() > 0 and xs.max() < 199 and ys.min() > 0 and ys.max() < 199


def test_all_shapes_render_with_many_classes() -> None:
    cfg = ShapesConfig(num_classes=MAX_CLASSES, num_train=40, num_val=1, num_test=0,
                       image_size=64)
    drawn = {o.shape for s in _scenes(cfg) for o in s.objects}
    assert drawn == set(SHAPES)


def test_bad_index_or_split_is_a_user_error() -> None:
    with pytest.raises(WeakTrError, match="no index 20"):
        render_sample(TINY, "train", 20)
    with pytest.raises(WeakTrError, match="no split"):
        render_sample(TINY, "holdout", 0)
    with pytest.raises(WeakTrError, match="no index 5"):
        render_sample(TINY, "test", 5)


# ----------------------------------------------------------------------------- cache


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_ensure_writes_the_voc_layout(tmp_path: Path) -> None:
    voc = ensure_shapes(TINY, cache_dir=tmp_path)
    assert voc == tmp_path / f"shapes-{TINY.fingerprint()}" / "VOC2012"
    train = (voc / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (voc / "ImageSets/Segmentation/val.txt").read_text().split()
    test = (voc / "ImageSets/Segmentation/test.txt").read_text().split()
    assert train[0] == "shapes_train_000000" and len(train) == 20 and len(val) == 6
    assert test == [f"shapes_test_{i:06d}" for i in range(5)]
    assert open_shapes("test", root=voc).ids == test
    info = json.loads((voc / "weaktr_dataset.json").read_text())
    assert info["name"] == "shapes"
    assert info["class_names"] == list(class_names(TINY))
    assert info["config"] == TINY.to_dict()
    img, mask = render_sample(TINY, "val", 2)
    with Image.open(voc / "JPEGImages/shapes_val_000002.png") as im:
        assert im.mode == "RGB" and np.array_equal(np.array(im), img)
    with Image.open(voc / "SegmentationClass/shapes_val_000002.png") as im:
        assert im.mode == "P" and np.array_equal(np.array(im), mask)
        assert im.getpalette()[3:6] == [128, 0, 0]  # PASCAL palette: id 1 is dark red
    assert [p.name for p in tmp_path.iterdir()] == [voc.parent.name]  # no temp left


def test_two_generations_are_byte_identical(tmp_path: Path) -> None:
    a = ensure_shapes(TINY, cache_dir=tmp_path / "a")
    b = ensure_shapes(TINY, cache_dir=tmp_path / "b")
    assert _tree_bytes(a) == _tree_bytes(b)


def test_cached_dataset_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    voc = ensure_shapes(TINY, cache_dir=tmp_path)

    def fail(*args: object) -> None:
        raise AssertionError("regenerated a cached dataset")

    monkeypatch.setattr(shapes, "_write_dataset", fail)
    assert ensure_shapes(TINY, cache_dir=tmp_path) == voc


def test_default_cache_dir_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEAKTR_CACHE", str(tmp_path / "cache"))
    voc = ensure_shapes(TINY)
    assert voc.is_relative_to(tmp_path / "cache")


def test_stale_temp_folder_does_not_break_generation(tmp_path: Path) -> None:
    stale = tmp_path / f".shapes-{TINY.fingerprint()}-deadbeef.partial" / "VOC2012" / "JPEGImages"
    stale.mkdir(parents=True)
    (stale / "shapes_train_000000.png").write_bytes(b"truncated")
    voc = ensure_shapes(TINY, cache_dir=tmp_path)
    assert len(list((voc / "JPEGImages").iterdir())) == 31  # 20 train, 6 val, 5 test


def test_interrupted_generation_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def dying_write(path: Path, image: np.ndarray) -> None:
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(shapes, "write_rgb", dying_write)
    with pytest.raises(KeyboardInterrupt):
        ensure_shapes(TINY, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_losing_the_rename_race_keeps_the_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second process finishing first: our rename fails, we discard our copy and succeed."""
    real_write = shapes._write_dataset
    winner: list[Path] = []

    def racing_write(voc: Path, config: ShapesConfig, progress: object) -> None:
        if not winner:
            monkeypatch.setattr(shapes, "_write_dataset", real_write)
            winner.append(ensure_shapes(config, cache_dir=tmp_path))  # the "other process"
        real_write(voc, config, None)

    monkeypatch.setattr(shapes, "_write_dataset", racing_write)
    voc = ensure_shapes(TINY, cache_dir=tmp_path)
    assert winner == [voc]
    assert [p.name for p in tmp_path.iterdir()] == [voc.parent.name]
    assert len(list((voc / "SegmentationClass").iterdir())) == 31  # 20 train, 6 val, 5 test


def test_incomplete_target_is_reported(tmp_path: Path) -> None:
    (tmp_path / f"shapes-{TINY.fingerprint()}" / "VOC2012").mkdir(parents=True)
    with pytest.raises(WeakTrError, match="not a complete shapes dataset") as err:
        ensure_shapes(TINY, cache_dir=tmp_path)
    assert err.value.hint and "delete" in err.value.hint


def test_unwritable_cache_is_a_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(WeakTrError, match="cannot create the shapes cache"):
        ensure_shapes(TINY, cache_dir=blocker / "cache")


def test_progress_is_reported(tmp_path: Path) -> None:
    ticks: list[tuple[int, int]] = []
    ensure_shapes(TINY, cache_dir=tmp_path, progress=lambda d, t: ticks.append((d, t)))
    assert ticks[0] == (1, 31) and ticks[-1] == (31, 31) and len(ticks) == 31


# ----------------------------------------------------------------------------- loader


def test_open_shapes_reads_through_the_voc_loader(tmp_path: Path) -> None:
    ds = open_shapes("val", root=tmp_path, config=TINY)
    assert ds.name == "shapes"
    assert ds.class_names == class_names(TINY)
    assert len(ds) == 6 and ds.has_masks
    for index, image_id in enumerate(ds.ids):
        scene = render_scene(TINY, "val", index)
        assert np.array_equal(ds.load_image(image_id), scene.image)
        assert np.array_equal(ds.load_mask(image_id), scene.mask)
        expected = sorted({o.class_id for o in scene.objects})
        assert ds.image_labels(image_id).tolist() == expected
    # a generated folder can be opened directly, without its config
    again = open_shapes("train", root=ds.root.parent)
    assert len(again) == 20 and again.class_names == ds.class_names


def test_open_shapes_rejects_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(WeakTrError, match="no split"):
        open_shapes("trainaug", root=tmp_path, config=TINY)
    assert not os.listdir(tmp_path)  # nothing generated for a bad request


def test_open_shapes_takes_a_list_file_of_train_and_val_ids(tmp_path: Path) -> None:
    train = open_shapes("train", root=tmp_path / "cache", config=TINY)
    val = open_shapes("val", root=tmp_path / "cache", config=TINY)
    chosen = [train.ids[3], val.ids[0], train.ids[0]]
    listed = tmp_path / "some.txt"
    listed.write_text("".join(f"{i}\n" for i in chosen))
    subset = open_shapes(str(listed), root=tmp_path / "cache", config=TINY)
    assert subset.ids == chosen
    assert np.array_equal(subset.load_mask(chosen[1]), val.load_mask(chosen[1]))
    with pytest.raises(WeakTrError, match="not found"):
        open_shapes(str(tmp_path / "missing.txt"), root=tmp_path / "cache", config=TINY)
