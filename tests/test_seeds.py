"""Seeds (Phase 3): threshold rule, CRF parity with a direct pydensecrf call, workers, resume."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

# The tiny dataset lives in a module (tests is a package on pytest's sys.path, which spawn
# workers inherit) so that make_seeds(workers=2) can unpickle it.
from tests._tiny_data import TinyDataset, blob, write_tiny_cams
from weaktr_cli.artifacts import ArtifactWriter, CamRecord, new_meta, open_artifact
from weaktr_cli.dense_crf import (
    PRESETS,
    CrfParams,
    crf_from_labels,
    get_preset,
    import_densecrf,
)
from weaktr_cli.errors import WeakTrError
from weaktr_cli.seeds import (
    ambiguous_seed_pixels,
    cams_to_label,
    cams_to_probs,
    label_ids,
    make_seeds,
    seed_image,
)

VOC = get_preset("voc")


def record(class_ids: list[int], maps: list[list[list[float]]]) -> CamRecord:
    return CamRecord(
        class_ids=np.array(class_ids, dtype=np.int64), maps=np.array(maps, dtype=np.float32)
    )


def read_all(path: Path) -> dict[str, np.ndarray]:
    with open_artifact(path, kind="labels") as reader:
        return {i: reader.read_labels(i) for i in reader.ids}


# ------------------------------------------------------------------ threshold rule


def test_cams_to_label_tie_rule_and_id_mapping() -> None:
    # Classes listed out of order on purpose: ties between classes go to the lower class id.
    rec = record(
        [15, 3],
        [
            [[0.5, 0.9, 0.2, 0.7, 0.50001]],  # class 15
            [[0.5, 0.1, 0.2, 0.7, 0.1]],  # class 3
        ],
    )
    label = cams_to_label(rec, bg=0.5)
    assert label.dtype == np.uint8 and label.shape == (1, 5)
    # col 0: both equal bg -> background; col 1: 15 wins; col 2: all below -> background;
    # col 3: 15 and 3 tie above bg -> 3 (lower id); col 4: 15 strictly above bg -> 15.
    assert label.tolist() == [[0, 15, 0, 3, 15]]
    assert label_ids(rec).tolist() == [0, 3, 15]


def test_cams_to_label_without_classes_is_background() -> None:
    rec = CamRecord(class_ids=np.zeros(0, np.int64), maps=np.zeros((0, 3, 4), np.float32))
    assert cams_to_label(rec, bg=0.0).tolist() == [[0] * 4] * 3
    image = np.full((3, 4, 3), 100, np.uint8)
    assert seed_image(image, rec, bg=0.4, params=VOC).tolist() == [[0] * 4] * 3


def test_cams_to_probs_normalises_and_keeps_the_argmax() -> None:
    rng = np.random.default_rng(0)
    rec = CamRecord(
        class_ids=np.array([9, 2], np.int64), maps=rng.random((2, 6, 7)).astype(np.float32)
    )
    probs = cams_to_probs(rec, bg=0.43)
    assert probs.shape == (3, 6, 7) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, rtol=1e-6)
    # compact order is [background, class 2, class 9]
    np.testing.assert_allclose(probs[1] / probs[0], rec.maps[1] / 0.43, rtol=1e-5)
    assert (label_ids(rec)[probs.argmax(axis=0)] == cams_to_label(rec, bg=0.43)).all()
    zero = CamRecord(class_ids=np.array([1], np.int64), maps=np.zeros((1, 2, 2), np.float32))
    np.testing.assert_allclose(cams_to_probs(zero, bg=0.0), 0.5)


def test_ambiguous_seed_pixels_are_foreground_pixels_another_class_nearly_matches() -> None:
    # classes 3 and 5; seed labels in dataset ids, 255 ignored, 0 background
    rec = record([5, 3], [[[0.9, 0.9, 0.1, 0.5]], [[1.0, 0.5, 0.8, 0.5]]])
    label = np.array([[3, 5, 3, 0]], np.uint8)
    # pixel 0: seed 3 (1.0) vs 5 (0.9) -> ambiguous at 0.7, not at 0.95
    # pixel 1: seed 5 (0.9) vs 3 (0.5) -> 0.56, kept at 0.7; pixel 2: 0.1 / 0.8, kept
    assert ambiguous_seed_pixels(label, rec, 0.7).tolist() == [[True, False, False, False]]
    assert ambiguous_seed_pixels(label, rec, 0.5).tolist() == [[True, True, False, False]]
    assert not ambiguous_seed_pixels(label, rec, 0.95).any()
    ignored = np.array([[255, 5, 3, 0]], np.uint8)
    assert not ambiguous_seed_pixels(ignored, rec, 0.5)[0, 0]  # ignored stays as it is
    single = record([3], [[[1.0, 1.0]]])
    assert not ambiguous_seed_pixels(np.array([[3, 3]], np.uint8), single, 0.1).any()
    with pytest.raises(WeakTrError, match="ambiguity ratio"):
        ambiguous_seed_pixels(label, rec, 0.0)
    with pytest.raises(WeakTrError, match="differ in size"):
        ambiguous_seed_pixels(np.zeros((2, 2), np.uint8), rec, 0.7)


def test_bad_background_threshold() -> None:
    rec = record([1], [[[0.5]]])
    with pytest.raises(WeakTrError, match=r"background threshold must be in \[0, 1\]"):
        cams_to_label(rec, bg=43)


# ------------------------------------------------------------------ CRF wrapper


def test_presets_match_the_method() -> None:
    assert set(PRESETS) == {"voc", "coco", "voc-test", "coco-test"}
    assert PRESETS["voc"] == CrfParams(0.7, 10, 4, 3, 83, 5, 3)
    assert PRESETS["coco"] == CrfParams(0.7, 10, 3, 3, 50, 5, 10)
    assert PRESETS["voc-test"] == CrfParams(0.7, 10, 3, 3, 83, 5, 3)
    assert PRESETS["coco-test"] == CrfParams(0.7, 10, 1, 3, 67, 3, 4)
    faster = dataclasses.replace(get_preset("coco"), iterations=3)
    assert faster.iterations == 3 and faster.bilateral_compat == 10
    with pytest.raises(WeakTrError, match="unknown CRF preset 'pascal'") as info:
        get_preset("pascal")
    assert info.value.hint is not None and "voc, coco, voc-test, coco-test" in info.value.hint
    with pytest.raises(WeakTrError, match="gt_prob"):
        dataclasses.replace(VOC, gt_prob=1.0)


def test_missing_pydensecrf_gives_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(WeakTrError, match="pydensecrf is not importable") as info:
        import_densecrf()
    assert info.value.hint is not None and "pip install pydensecrf2" in info.value.hint
    image = np.zeros((4, 5, 3), np.uint8)
    with pytest.raises(WeakTrError, match="pydensecrf is not importable"):
        crf_from_labels(image, np.zeros((4, 5), np.int64), 2, VOC)
    # make_seeds fails before writing anything; --no-crf seeds still work without it.
    data = TinyDataset(n=2)
    cams = write_tiny_cams(tmp_path / "cams.h5", data)
    with pytest.raises(WeakTrError, match="pydensecrf is not importable"):
        make_seeds(cams, data, tmp_path / "seeds.h5", bg=0.4, params=VOC)
    assert not list(tmp_path.glob("seeds.h5*"))
    out = make_seeds(cams, data, tmp_path / "plain.h5", bg=0.4, params=None)
    assert set(read_all(out)) == set(data.ids)


def test_mark_disagreement_sets_exactly_the_changed_pixels() -> None:
    data = TinyDataset(n=1)
    image_id = data.ids[0]
    class_ids, maps = data.cams(image_id)
    rec = CamRecord(class_ids=class_ids, maps=maps)
    image = data.load_image(image_id)
    plain = seed_image(image, rec, bg=0.4, params=None)
    crf = seed_image(image, rec, bg=0.4, params=VOC)
    marked = seed_image(image, rec, bg=0.4, params=VOC, mark_disagreement=True)
    changed = crf != plain
    assert changed.any() and (~changed).any()  # the CRF did move the shifted CAM blobs
    assert (marked[changed] == 255).all()
    assert (marked[~changed] == crf[~changed]).all()
    with pytest.raises(WeakTrError, match="needs the CRF"):
        seed_image(image, rec, bg=0.4, params=None, mark_disagreement=True)


# ------------------------------------------------------------------ make_seeds


def test_workers_1_and_2_give_identical_seeds(tmp_path: Path) -> None:
    data = TinyDataset(n=5)
    cams = write_tiny_cams(tmp_path / "cams.h5", data)
    calls: list[tuple[int, int]] = []
    one = make_seeds(cams, data, tmp_path / "w1.h5", bg=0.4, params=VOC, workers=1)
    two = make_seeds(
        cams,
        data,
        tmp_path / "w2.h5",
        bg=0.4,
        params=VOC,
        workers=2,
        progress=lambda done, total: calls.append((done, total)),
    )
    a, b = read_all(one), read_all(two)
    assert list(a) == list(b) == data.ids  # written in dataset order
    for image_id in data.ids:
        assert a[image_id].tobytes() == b[image_id].tobytes()
        assert set(np.unique(a[image_id])) <= {0, *data.image_labels(image_id).tolist()}
    assert calls == [(i, 5) for i in range(6)]
    meta = open_artifact(two).meta
    assert meta.kind == "labels" and meta.config["crf"] == VOC.to_dict()
    assert meta.config["bg"] == 0.4 and meta.config["unary"] == "hard"
    assert meta.parents[0]["path"] == str(cams.resolve())


def test_resume_continues_a_partial_file(tmp_path: Path) -> None:
    data = TinyDataset(n=4)
    cams = write_tiny_cams(tmp_path / "cams.h5", data)
    full = read_all(make_seeds(cams, data, tmp_path / "full.h5", bg=0.4, params=VOC))

    def interrupt(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    out = tmp_path / "seeds.h5"
    with pytest.raises(KeyboardInterrupt):
        make_seeds(cams, data, out, bg=0.4, params=VOC, progress=interrupt)
    partial = tmp_path / "seeds.h5.partial"
    assert not out.exists() and partial.exists()

    with pytest.raises(WeakTrError, match="other settings"):
        make_seeds(cams, data, out, bg=0.3, params=VOC)
    seen: list[tuple[int, int]] = []
    make_seeds(cams, data, out, bg=0.4, params=VOC, progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (2, 4)  # two images came from the partial file
    resumed = read_all(out)
    assert list(resumed) == list(full)
    assert all(np.array_equal(resumed[i], full[i]) for i in full)
    assert not partial.exists()


def test_shard_takes_every_nth_image(tmp_path: Path) -> None:
    data = TinyDataset(n=5)
    cams = write_tiny_cams(tmp_path / "cams.h5", data)
    out = make_seeds(cams, data, tmp_path / "s.h5", bg=0.4, params=None, shard=(2, 2))
    assert list(read_all(out)) == [data.ids[1], data.ids[3]]
    assert open_artifact(out).meta.config["shard"] == [2, 2]


def test_image_and_cam_size_mismatch_names_the_image(tmp_path: Path) -> None:
    data = TinyDataset(n=3)
    cams = write_tiny_cams(tmp_path / "cams.h5", data, sizes={data.ids[1]: (20, 40)})
    with pytest.raises(WeakTrError, match=r"'img01' is 30x40 \(HxW\) but its CAMs are 20x40"):
        make_seeds(cams, data, tmp_path / "seeds.h5", bg=0.4, params=VOC)
    # the image before it was kept for a resume
    assert (tmp_path / "seeds.h5.partial").exists() and not (tmp_path / "seeds.h5").exists()


def test_worker_errors_keep_their_hint(tmp_path: Path) -> None:
    data = TinyDataset(n=4)
    cams = write_tiny_cams(tmp_path / "cams.h5", data, sizes={data.ids[2]: (20, 40)})
    with pytest.raises(WeakTrError, match="'img02' is 30x40") as info:
        make_seeds(cams, data, tmp_path / "seeds.h5", bg=0.4, params=None, workers=2)
    assert info.value.hint is not None and "dump CAMs" in info.value.hint


def test_cam_ids_missing_from_the_dataset(tmp_path: Path) -> None:
    cams = write_tiny_cams(tmp_path / "cams.h5", TinyDataset(n=4))
    with pytest.raises(WeakTrError, match=r"2 image\(s\) of .* are not in dataset 'tiny'.*'img02'"):
        make_seeds(cams, TinyDataset(n=2), tmp_path / "seeds.h5", bg=0.4, params=None)


def test_class_names_must_match(tmp_path: Path) -> None:
    data = TinyDataset(n=1)
    meta = new_meta("cams", "tiny", "train", ("background", "x"))
    with ArtifactWriter(tmp_path / "cams.h5", meta) as writer:
        writer.write_cams("img00", np.array([1]), np.zeros((1, 30, 40), np.float32))
        cams = writer.finalize()
    with pytest.raises(WeakTrError, match="other class names"):
        make_seeds(cams, data, tmp_path / "seeds.h5", bg=0.4, params=None)


# ------------------------------------------------------------------ parity on a real image


def direct_crf_seeds(
    image: np.ndarray, class_ids: np.ndarray, maps: np.ndarray, bg: float
) -> np.ndarray:
    """The reference recipe written out with pydensecrf, independently of weaktr_cli.dense_crf."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    order = np.argsort(class_ids)
    keys = np.concatenate([[0], class_ids[order]]).astype(np.uint8)
    cam = np.concatenate([np.full((1, *maps.shape[1:]), bg, np.float32), maps[order]])
    label = np.argmax(cam, axis=0)
    h, w = image.shape[:2]
    n = cam.shape[0]
    d = dcrf.DenseCRF2D(w, h, n)
    d.setUnaryEnergy(unary_from_labels(label, n, gt_prob=0.7, zero_unsure=False))
    d.addPairwiseGaussian(sxy=4, compat=3)
    d.addPairwiseBilateral(sxy=83, srgb=5, rgbim=np.ascontiguousarray(np.copy(image)), compat=3)
    q = np.array(d.inference(10)).reshape((n, h, w))
    return keys[np.argmax(q, axis=0)]


@pytest.mark.shared_data
def test_parity_with_direct_pydensecrf_on_real_voc(voc_sample: Path, tmp_path: Path) -> None:
    from weaktr_cli.data.voc import VocDataset

    data = VocDataset(voc_sample, "trainval")
    ids = ["2007_000032", "2007_000033"]
    if not all(i in data.ids for i in ids):
        pytest.skip(f"VOC samples {ids} not in {voc_sample}")
    meta = new_meta("cams", data.name, data.split, data.class_names)
    with ArtifactWriter(tmp_path / "cams.h5", meta) as writer:
        for image_id in ids:
            mask = data.load_mask(image_id)
            assert mask is not None
            class_ids = data.image_labels(image_id)
            maps = []
            for cls in class_ids:  # a smooth blob over each object, off-centre like a CAM
                ys, xs = np.nonzero(mask == cls)
                maps.append(
                    blob(
                        *mask.shape,
                        ys.mean() + 8,
                        xs.mean() - 5,
                        ys.std() * 2 + 1,
                        xs.std() * 2 + 1,
                    )
                )
            writer.write_cams(image_id, class_ids, np.stack(maps))
        cams = writer.finalize()

    out = make_seeds(cams, data, tmp_path / "seeds.h5", bg=0.43, params=VOC, workers=2)
    got = read_all(out)
    with open_artifact(cams, kind="cams") as reader:
        for image_id in ids:
            rec = reader.read_cams(image_id)
            image = data.load_image(image_id)
            expected = direct_crf_seeds(image, rec.class_ids, rec.maps, 0.43)
            assert np.array_equal(got[image_id], expected)
            assert not np.array_equal(expected, cams_to_label(rec, 0.43))  # the CRF acted
            direct = seed_image(image, rec, bg=0.43, params=VOC, image_id=image_id)
            assert np.array_equal(direct, expected)


@pytest.mark.shared_data
def test_soft_unary_matches_direct_unary_from_softmax(voc_sample: Path) -> None:
    import pydensecrf.densecrf as dcrf
    from PIL import Image
    from pydensecrf.utils import unary_from_softmax

    path = voc_sample / "JPEGImages" / "2007_000032.jpg"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    image = np.asarray(Image.open(path).convert("RGB"))  # read-only on purpose
    h, w = image.shape[:2]
    rec = CamRecord(
        class_ids=np.array([1, 15], np.int64),
        maps=np.stack([blob(h, w, 120, 250, 60, 150), blob(h, w, 220, 80, 50, 30)]),
    )
    params = get_preset("voc-test")
    got = seed_image(image, rec, bg=0.43, params=params, unary="soft")

    planes = np.concatenate([np.full((1, h, w), 0.43, np.float32), rec.maps])
    probs = planes / planes.sum(axis=0, keepdims=True)
    d = dcrf.DenseCRF2D(w, h, 3)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=83, srgb=5, rgbim=np.copy(image), compat=3)
    q = np.array(d.inference(10)).reshape((3, h, w))
    expected = np.array([0, 1, 15], np.uint8)[np.argmax(q, axis=0)]
    assert np.array_equal(got, expected)
