"""Sliding-window rules shared by the PyTorch and the onnxruntime predictors.

Torch-free on purpose: `weaktr predict --onnx` must run where torch is not installed, and both
predictors must cut the same windows and rescale to the same sizes, so their outputs can be
compared pixel for pixel (both turn probabilities into labels with
`weaktr_cli.dense_crf.label_from_probs`).
"""

from __future__ import annotations

__all__ = ["pass_size", "reference_pass_sizes", "window_starts"]


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window starts along one axis (the reference's rule): every `stride` pixels, plus one
    window that ends at the border. Needs size >= window."""
    starts = [a for a in range(0, size, stride) if a < size - window]
    return [*starts, size - window]


def pass_size(height: int, width: int, scale: float, window: int,
              base_size: int | None) -> tuple[int, int]:
    """(H', W') of one inference scale: the short side becomes `scale` x `base_size` (or x the
    image's own short side), raised to the window if it falls below it; aspect kept."""
    short = min(height, width)
    target = scale * (base_size if base_size is not None else short)
    factor = max(target, window) / short
    return max(window, round(height * factor)), max(window, round(width * factor))


def reference_pass_sizes(height: int, width: int, ratio: float, im_size: int, window: int,
                         max_ratio: int = 8) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two sizes (H, W) one pass of the reference's test-time procedure goes through.

    1. The dataset pipeline (mmseg `MultiScaleFlipAug` + `Resize(keep_ratio=True)`) rescales
       the uint8 image to fit (int(max_ratio * im_size * ratio), int(im_size * ratio)): factor
       min(long_target / long, short_target / short), sides rounded int(x + 0.5).
    2. `inference` then upsamples the normalised image, only when its short side is below
       `window`, to short side `window` with the long side truncated (int(aspect * window)).

    A 500x375 VOC image at im_size 520, window 480 and ratios 0.5-1.75 gets short sides
    480, 480, 520, 650, 780, 910 (docs/REPRODUCING.md; hustvl/WeakTr 0ff9d9a
    OnlineRetraining/segm/model/utils.py:106-118, OnlineRetraining/segm/data/base.py:58).
    """
    short_target = int(im_size * ratio)
    long_target = int(max_ratio * im_size * ratio)
    factor = min(long_target / max(height, width), short_target / min(height, width))
    resized = (int(height * factor + 0.5), int(width * factor + 0.5))
    h1, w1 = resized
    if min(h1, w1) >= window:
        return resized, resized
    # The reference's arithmetic, kept literally: the aspect as a float, then truncation.
    if h1 < w1:
        return resized, (window, int(w1 / h1 * window))
    return resized, (int(h1 / w1 * window), window)
