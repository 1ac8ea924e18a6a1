"""Prediction: sliding windows, upsampling, flip symmetry, layer fusion, artifacts, folders."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from weaktr_cli.artifacts import open_artifact
from weaktr_cli.data.base import IGNORE_INDEX, SegmentationDataset
from weaktr_cli.data.folder import ImageFolderDataset
from weaktr_cli.data.images import read_label_png
from weaktr_cli.errors import WeakTrError
from weaktr_cli.evaluation import evaluate_artifact
from weaktr_cli.models.segmenter import build_segmenter
from weaktr_cli.per_image import PerImageRun
from weaktr_cli.predict import (
    PredictSettings,
    label_from_probs,
    predict_probs,
    predict_split,
    settings_for_checkpoint,
    write_png_dir,
)
from weaktr_cli.windows import window_starts

CLASSES = ("background", "red", "blue")
SETTINGS = PredictSettings(window=32, stride=20, flip=False, precision="fp32")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_segmenter(len(CLASSES), "micro", img_size=32).eval()


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


class Boxes(SegmentationDataset):
    """Three images of different sizes with pixel ground truth (one box of class 1)."""

    name = "boxes"
    split = "val"
    class_names = CLASSES
    sizes: ClassVar[dict[str, tuple[int, int]]] = {"a": (30, 40), "b": (50, 70), "c": (20, 24)}

    def __init__(self) -> None:
        self.ids = list(self.sizes)

    def load_image(self, image_id: str) -> np.ndarray:
        return image(*self.sizes[image_id], seed=len(image_id) + ord(image_id))

    def load_mask(self, image_id: str) -> np.ndarray:
        mask = np.zeros(self.sizes[image_id], np.uint8)
        mask[5:15, 5:15] = 1
        mask[0] = IGNORE_INDEX
        return mask

    def image_labels(self, image_id: str) -> np.ndarray:
        return np.array([1], dtype=np.int64)

    @property
    def has_masks(self) -> bool:
        return True


def test_window_starts_cover_and_end_at_the_border():
    assert window_starts(75, 32, 21) == [0, 21, 42, 43]  # the reference's rule
    assert window_starts(32, 32, 20) == [0]
    for size in (32, 33, 50, 97):
        starts = window_starts(size, 32, 20)
        covered = np.zeros(size, bool)
        for a in starts:
            covered[a : a + 32] = True
        assert covered.all() and starts[-1] + 32 == size


def test_sliding_window_on_a_large_image(model):
    probs = predict_probs(model, image(45, 83), SETTINGS, "cpu")
    assert probs.shape == (3, 45, 83) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)


def test_window_covering_the_whole_image_is_one_forward(model):
    # An image exactly one window large: the result is the softmax of one forward pass.
    img = image(32, 32)
    probs = predict_probs(model, img, dataclasses.replace(SETTINGS, normalization="inception"),
                          "cpu")
    x = (torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        expected = model(x)[0].softmax(0).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_small_image_is_upsampled_to_the_window(model):
    probs = predict_probs(model, image(10, 17), SETTINGS, "cpu")
    assert probs.shape == (3, 10, 17)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)


def test_multi_scale_and_base_size(model):
    settings = dataclasses.replace(SETTINGS, scales=(0.5, 1.0, 1.5), base_size=40)
    probs = predict_probs(model, image(37, 52), settings, "cpu")
    assert probs.shape == (3, 37, 52)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)


def test_flip_averaging_is_mirror_symmetric_for_a_symmetric_image(model):
    half = image(40, 29)
    symmetric = np.ascontiguousarray(np.concatenate([half, half[:, ::-1]], axis=1))  # 40 x 58
    settings = dataclasses.replace(SETTINGS, flip=True, scales=(1.0, 1.3))
    probs = predict_probs(model, symmetric, settings, "cpu")
    np.testing.assert_allclose(probs, probs[:, :, ::-1], atol=1e-5)
    # Without flips the model alone is not symmetric, so the check above is not vacuous.
    plain = predict_probs(model, symmetric, dataclasses.replace(settings, flip=False), "cpu")
    assert np.abs(plain - plain[:, :, ::-1]).max() > 1e-3


def test_layer_fusion_mixes_per_layer_probabilities(model):
    img = image(30, 47)
    last = predict_probs(model, img, SETTINGS, "cpu")
    p2 = predict_probs(model, img, dataclasses.replace(SETTINGS, layer_weights=(0.0, 1.0)), "cpu")
    p1 = predict_probs(model, img, dataclasses.replace(SETTINGS, layer_weights=(1.0, 0.0)), "cpu")
    fused = predict_probs(model, img, dataclasses.replace(SETTINGS, layer_weights=(0.8, 1.0)),
                          "cpu")
    np.testing.assert_allclose(p2, last, atol=1e-6)
    np.testing.assert_allclose(fused, (0.8 * p1 + p2) / 1.8, atol=1e-5)
    assert np.abs(p1 - p2).max() > 1e-3  # the two decoder layers do differ


def test_settings_errors(model):
    with pytest.raises(WeakTrError, match="stride"):
        predict_probs(model, image(8, 8), dataclasses.replace(SETTINGS, stride=40), "cpu")
    with pytest.raises(WeakTrError, match="3 layer weights for a decoder of 2"):
        predict_probs(model, image(8, 8),
                      dataclasses.replace(SETTINGS, layer_weights=(1, 1, 1)), "cpu")
    with pytest.raises(WeakTrError, match="CRF preset"):
        PredictSettings(crf="nope").check()


def test_settings_for_checkpoint_takes_crop_and_normalization():
    meta = {"model": {"img_size": 96, "normalization": "inception"}}
    settings = settings_for_checkpoint(meta)
    assert (settings.window, settings.stride, settings.normalization) == (96, 64, "inception")
    assert settings_for_checkpoint(meta, scales=(1.0, 1.5)).scales == (1.0, 1.5)
    # a recipe's settings keep their scales etc. but get the checkpoint's window
    base = PredictSettings(window=480, stride=320, scales=(0.5, 1.0), crf="voc-test")
    fitted = settings_for_checkpoint(meta, base)
    assert (fitted.window, fitted.stride, fitted.scales, fitted.crf) == (96, 64, (0.5, 1.0),
                                                                         "voc-test")
    assert settings_for_checkpoint(meta, base, window=128).window == 128


def test_label_from_probs_with_crf_keeps_present_classes():
    pytest.importorskip("pydensecrf")
    probs = np.full((3, 20, 24), 0.1, np.float32)
    probs[0] = 0.8
    probs[2, 5:15, 5:15] = 0.85
    probs /= probs.sum(0, keepdims=True)
    plain = label_from_probs(probs)
    refined = label_from_probs(probs, image(20, 24), crf="voc-test")
    assert set(np.unique(plain)) == {0, 2}
    assert refined.dtype == np.uint8 and set(np.unique(refined)) <= {0, 2}


def test_predict_split_artifact_loads_and_evaluates(model, tmp_path):
    dataset = Boxes()
    out = predict_split(model, PerImageRun(dataset, tmp_path / "pred.h5", "cpu"), SETTINGS,
                        class_names=CLASSES)
    n = len(CLASSES)
    matrix = np.zeros((n, n), np.int64)  # rows ground truth, columns prediction
    with open_artifact(out) as reader:
        assert reader.kind == "labels" and reader.ids == dataset.ids
        for image_id in dataset.ids:
            label = reader.read_labels(image_id)
            assert label.shape == dataset.sizes[image_id] and label.max() < len(CLASSES)
            # the labels are the argmax of predict_probs, image by image
            probs = predict_probs(model, dataset.load_image(image_id), SETTINGS, "cpu")
            np.testing.assert_array_equal(label, probs.argmax(0))
            gt = dataset.load_mask(image_id).astype(np.int64)
            keep = gt != 255
            matrix += np.bincount(n * gt[keep] + label[keep], minlength=n * n).reshape(n, n)
        result = evaluate_artifact(reader, dataset)
    tp = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - tp
    assert result.scores.miou == pytest.approx((tp[union > 0] / union[union > 0]).mean())
    # the PNG folder holds the same label maps
    assert write_png_dir(out, tmp_path / "png") == 3
    with open_artifact(out) as reader:
        for image_id in dataset.ids:
            png = read_label_png(tmp_path / "png" / f"{image_id}.png")
            np.testing.assert_array_equal(png, reader.read_labels(image_id))


def test_predict_split_resumes_and_shards(model, tmp_path):
    dataset = Boxes()
    first = predict_split(model, PerImageRun(dataset, tmp_path / "s1.h5", "cpu", shard=(1, 2)),
                          SETTINGS, class_names=CLASSES)
    with open_artifact(first) as reader:
        assert reader.ids == ["a", "c"]
    calls: list[tuple[int, int]] = []
    run = PerImageRun(dataset, tmp_path / "s1.h5", "cpu", shard=(1, 2),
                      progress=lambda d, t: calls.append((d, t)))
    predict_split(model, run, SETTINGS, class_names=CLASSES)
    assert calls[-1] == (2, 2)


def test_predict_split_class_mismatch(model, tmp_path):
    with pytest.raises(WeakTrError, match="3 classes"):
        predict_split(model, PerImageRun(Boxes(), tmp_path / "x.h5", "cpu"), SETTINGS,
                      class_names=("background", "cat", "dog"))


def test_image_folder_dataset(tmp_path, model):
    for name, size in (("b", (20, 30)), ("a", (25, 18))):
        Image.fromarray(image(*size)).save(tmp_path / f"{name}.png")
    Image.fromarray(image(16, 16)).save(tmp_path / "c.JPG")
    (tmp_path / "notes.txt").write_text("not an image")
    folder = ImageFolderDataset(tmp_path, CLASSES)
    assert folder.ids == ["a", "b", "c"] and not folder.has_masks
    assert folder.load_mask("a") is None and folder.image_labels("a").size == 0
    assert folder.load_image("b").shape == (20, 30, 3)
    out = predict_split(model, PerImageRun(folder, tmp_path / "folder.h5", "cpu"), SETTINGS,
                        class_names=CLASSES)
    with open_artifact(out) as reader:
        assert reader.read_labels("c").shape == (16, 16)


def test_image_folder_errors(tmp_path):
    with pytest.raises(WeakTrError, match="no images"):
        ImageFolderDataset(tmp_path, CLASSES)
    Image.fromarray(image(8, 8)).save(tmp_path / "x.png")
    Image.fromarray(image(8, 8)).save(tmp_path / "x.jpg")
    with pytest.raises(WeakTrError, match="the id 'x'"):
        ImageFolderDataset(tmp_path, CLASSES)
    with pytest.raises(WeakTrError, match="background"):
        ImageFolderDataset(tmp_path, ("cat", "dog"))
    with pytest.raises(WeakTrError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", CLASSES)


def test_predict_split_refuses_a_partial_file_of_other_settings(model, tmp_path):
    from weaktr_cli.artifacts import ArtifactWriter, new_meta

    dataset = Boxes()
    meta = new_meta("labels", dataset.name, dataset.split, CLASSES, config={"other": 1})
    ArtifactWriter(tmp_path / "p.h5", meta).close()  # an interrupted run with other settings
    with pytest.raises(WeakTrError, match="other settings"):
        predict_split(model, PerImageRun(dataset, tmp_path / "p.h5", "cpu"), SETTINGS,
                      class_names=CLASSES)
