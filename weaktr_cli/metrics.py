"""Segmentation metrics from running confusion matrices (memory independent of image count).

Conventions (docs/method.md, "Evaluation"): pixels whose ground truth is 255 are skipped;
IoU_c = TP / (TP + FP + FN); mIoU is the mean over classes that occur in ground truth or
prediction (others are NaN and left out), so COCO's unused ids do not count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from weaktr_cli.data.base import IGNORE_INDEX
from weaktr_cli.errors import WeakTrError


@dataclass(frozen=True)
class Scores:
    """Per-class and summary scores; per-class arrays are float64 with NaN for absent classes."""

    iou: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    miou: float
    pixel_accuracy: float
    confusion: np.ndarray

    def to_dict(self, class_names: Sequence[str]) -> dict[str, object]:
        def clean(x: float) -> float | None:
            return None if np.isnan(x) else round(float(x) * 100, 4)

        return {
            "miou": clean(self.miou),
            "pixel_accuracy": clean(self.pixel_accuracy),
            "per_class": [
                {
                    "id": i,
                    "name": name,
                    "iou": clean(self.iou[i]),
                    "precision": clean(self.precision[i]),
                    "recall": clean(self.recall[i]),
                }
                for i, name in enumerate(class_names)
                if name
            ],
            "confusion": self.confusion.tolist(),
        }


def scores_from_confusion(confusion: np.ndarray) -> Scores:
    """Scores of a (C, C) confusion matrix whose rows are ground truth, columns prediction."""
    conf = confusion.astype(np.float64)
    tp = np.diag(conf)
    gt_total = conf.sum(axis=1)
    pred_total = conf.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        union = gt_total + pred_total - tp
        iou = np.where(union > 0, tp / union, np.nan)
        precision = np.where(pred_total > 0, tp / pred_total, np.nan)
        recall = np.where(gt_total > 0, tp / gt_total, np.nan)
    total = conf.sum()
    miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    accuracy = float(tp.sum() / total) if total > 0 else float("nan")
    return Scores(iou, precision, recall, miou, accuracy, confusion.copy())


class ConfusionMatrix:
    """Accumulates a (C, C) int64 confusion matrix over label maps, one image at a time."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image: pred and gt are (H, W) integer maps; gt 255 is skipped.

        A predicted 255 (an ignored seed pixel) counts as background, the most conservative read.
        """
        if pred.shape != gt.shape:
            raise WeakTrError(f"prediction is {pred.shape} but ground truth is {gt.shape}")
        n = self.num_classes
        # One bincount over (gt, pred) codes, 256 x (n + 1) bins: predicted ids >= n (255 and
        # any out-of-range one) share the last column, told apart only when it is not empty.
        # A fixed 65,536-bin histogram cost more than the rest of the update on small masks.
        width = n + 1
        code = gt.astype(np.uint16) * np.uint16(width) + np.minimum(pred, n)
        hist = np.bincount(code.ravel(), minlength=256 * width).reshape(256, width)
        hist = hist[:IGNORE_INDEX]  # rows of ignored ground truth drop out
        if hist[n:].any() or (
            hist[:n, n].any() and np.any((pred >= n) & (pred != IGNORE_INDEX) & (gt < n))
        ):
            raise WeakTrError(
                f"label ids reach beyond the {n} classes of the dataset",
                hint="the artifact and the dataset disagree on the number of classes",
            )
        self.matrix += hist[:n, :n]
        self.matrix[:, 0] += hist[:n, n]  # predicted 255 (ignored seed pixels)

    def scores(self) -> Scores:
        return scores_from_confusion(self.matrix)


def default_thresholds() -> np.ndarray:
    """The default background sweep 0.30, 0.31, ..., 0.60."""
    return np.round(np.arange(30, 61) / 100.0, 2)


class ThresholdSweep:
    """Confusion matrices of CAM label maps for many background thresholds in one pass.

    For threshold t a pixel is labelled with its strongest present class when that class's
    score is strictly above t, else background (ties go to background). A pixel's label is
    therefore fixed by how many thresholds lie below its top score, so one histogram over
    (gt, top class, threshold bin) per image gives every threshold's confusion exactly.
    """

    def __init__(self, num_classes: int, thresholds: Sequence[float] | np.ndarray) -> None:
        self.num_classes = num_classes
        self.thresholds = np.sort(np.asarray(thresholds, dtype=np.float64))
        # CAMs are float32: compare as `maps > t` does for float32 maps (NumPy casts t down).
        self._edges = self.thresholds.astype(np.float32).astype(np.float64)
        n, t = num_classes, len(self.thresholds)
        self._hist = np.zeros((n, n, t + 1), dtype=np.int64)

    def update(self, class_ids: np.ndarray, maps: np.ndarray, gt: np.ndarray) -> None:
        """Add one image: maps (K, H, W) for class_ids (K,), gt (H, W) with 255 ignored."""
        if maps.shape[1:] != gt.shape:
            raise WeakTrError(f"CAMs are {maps.shape[1:]} but ground truth is {gt.shape}")
        valid = gt != IGNORE_INDEX
        g = gt[valid].astype(np.int64)
        n, t = self.num_classes, len(self.thresholds)
        if g.size and g.max() >= n:
            raise WeakTrError(f"ground truth has class id {g.max()} but only {n} classes")
        if maps.shape[0] == 0:
            top_class = np.zeros_like(g)
            bin_index = np.zeros_like(g)
        else:
            scores = maps[:, valid]
            top = scores.argmax(axis=0)
            top_score = scores[top, np.arange(scores.shape[1])].astype(np.float64)
            top_class = np.asarray(class_ids, dtype=np.int64)[top]
            # bin b = number of thresholds strictly below the score: foreground for t_0..t_{b-1}
            bin_index = np.searchsorted(self._edges, top_score, side="left")
        flat = (g * n + top_class) * (t + 1) + bin_index
        self._hist += np.bincount(flat, minlength=n * n * (t + 1)).reshape(n, n, t + 1)

    def confusions(self) -> np.ndarray:
        """(T, C, C) confusion matrices, one per threshold in ascending order."""
        n, t = self.num_classes, len(self.thresholds)
        # tail[..., k] counts pixels with bin >= k; bin > j means foreground at threshold j.
        tail = np.cumsum(self._hist[:, :, ::-1], axis=2)[:, :, ::-1]
        per_gt_total = self._hist.sum(axis=(1, 2))
        out = np.zeros((t, n, n), dtype=np.int64)
        for j in range(t):
            above = tail[:, :, j + 1]
            out[j] = above
            out[j, :, 0] += per_gt_total - above.sum(axis=1)
        return out

    def results(self) -> list[tuple[float, Scores]]:
        return [
            (float(t), scores_from_confusion(c))
            for t, c in zip(self.thresholds, self.confusions(), strict=True)
        ]
