"""Metrics against an independent, naive per-pixel computation."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from weaktr_cli.metrics import ConfusionMatrix, ThresholdSweep, default_thresholds


def naive_scores(preds, gts, n):
    """Per class: loop over pixels, count TP/FP/FN; mIoU over classes with any TP+FP+FN."""
    tp = [0] * n
    fp = [0] * n
    fn = [0] * n
    for pred, gt in zip(preds, gts, strict=True):
        for p, g in zip(pred.ravel().tolist(), gt.ravel().tolist(), strict=True):
            if g == 255:
                continue
            p = 0 if p == 255 else p
            if p == g:
                tp[g] += 1
            else:
                fp[p] += 1
                fn[g] += 1
    ious = [tp[c] / (tp[c] + fp[c] + fn[c]) for c in range(n) if tp[c] + fp[c] + fn[c] > 0]
    return (sum(ious) / len(ious) if ious else float("nan")), tp, fp, fn


label_maps = st.integers(1, 4).flatmap(
    lambda n_img: st.tuples(
        st.integers(2, 6),
        st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**31)),
                 min_size=n_img, max_size=n_img),
    )
)


@settings(max_examples=60, deadline=None)
@given(label_maps)
def test_confusion_matches_naive(spec) -> None:
    n, images = spec
    preds, gts = [], []
    matrix = ConfusionMatrix(n)
    for h, w, seed in images:
        rng = np.random.default_rng(seed)
        gt = rng.integers(0, n, (h, w)).astype(np.uint8)
        gt[rng.random((h, w)) < 0.2] = 255
        pred = rng.integers(0, n, (h, w)).astype(np.uint8)
        pred[rng.random((h, w)) < 0.1] = 255
        matrix.update(pred, gt)
        preds.append(pred)
        gts.append(gt)
    scores = matrix.scores()
    miou, tp, fp, fn = naive_scores(preds, gts, n)
    assert np.isclose(scores.miou, miou, equal_nan=True)
    for c in range(n):
        if tp[c] + fp[c] > 0:
            assert np.isclose(scores.precision[c], tp[c] / (tp[c] + fp[c]))
        if tp[c] + fn[c] > 0:
            assert np.isclose(scores.recall[c], tp[c] / (tp[c] + fn[c]))


def naive_cam_label(class_ids, maps, t):
    """Background plane t in front, argmax with ties to the first (background)."""
    stack = np.concatenate([np.full((1, *maps.shape[1:]), t, np.float32), maps])
    idx = stack.argmax(axis=0)
    return np.concatenate([[0], class_ids])[idx]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31), st.integers(0, 3))
def test_threshold_sweep_matches_naive(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    n = 5
    thresholds = default_thresholds()
    sweep = ThresholdSweep(n, thresholds)
    per_t = [ConfusionMatrix(n) for _ in thresholds]
    for _ in range(3):
        h, w = rng.integers(3, 12, 2)
        class_ids = np.sort(rng.choice(np.arange(1, n), size=k, replace=False))
        # float16-representable scores, some exactly on thresholds, like stored CAMs
        maps = rng.random((k, h, w)).astype(np.float16).astype(np.float32)
        if k:
            maps[0, 0, 0] = np.float32(0.45)
        gt = rng.integers(0, n, (h, w)).astype(np.uint8)
        gt[0, 1] = 255
        sweep.update(class_ids, maps, gt)
        for t, matrix in zip(thresholds, per_t, strict=True):
            matrix.update(naive_cam_label(class_ids, maps, np.float32(t)).astype(np.uint8), gt)
    for (t, scores), matrix in zip(sweep.results(), per_t, strict=True):
        np.testing.assert_array_equal(scores.confusion, matrix.matrix, err_msg=f"t={t}")


def test_perfect_and_empty() -> None:
    gt = np.array([[0, 1], [2, 255]], np.uint8)
    matrix = ConfusionMatrix(3)
    matrix.update(gt, gt)
    s = matrix.scores()
    assert s.miou == 1.0 and s.pixel_accuracy == 1.0
    assert np.isnan(ConfusionMatrix(3).scores().miou)
