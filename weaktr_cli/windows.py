"""Sliding-window and label rules shared by the PyTorch and the onnxruntime predictors.

Torch-free on purpose: `weaktr predict --onnx` must run where torch is not installed, and both
predictors must cut the same windows, rescale to the same sizes and turn probabilities into
labels the same way, so their outputs can be compared pixel for pixel.
"""

from __future__ import annotations

import numpy as np

from weaktr_cli.errors import WeakTrError

__all__ = ["label_from_probs", "pass_size", "window_starts"]


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


def label_from_probs(probs: np.ndarray, image: np.ndarray | None = None,
                     crf: str | None = None) -> np.ndarray:
    """(H, W) uint8 argmax of (n_cls, H, W) probabilities, optionally CRF-refined.

    With a `crf` preset, the CRF runs on the image (RGB uint8, required) with the planes of
    the classes present in the argmax only (renormalised; a per-pixel constant in the unary
    does not change the CRF), as the reference does; one present class is returned as is.
    """
    if probs.shape[0] > 255:
        raise WeakTrError(f"{probs.shape[0]} classes do not fit a uint8 label map")
    label: np.ndarray = np.argmax(probs, axis=0).astype(np.uint8)
    if crf is None:
        return label
    from weaktr_cli.crf import crf_from_probs, get_preset

    if image is None:
        raise WeakTrError("the CRF needs the image")
    keys = np.unique(label)
    if len(keys) == 1:
        return label
    planes = probs[keys]
    planes = planes / np.maximum(planes.sum(axis=0, keepdims=True), 1e-12)
    refined = crf_from_probs(image, planes, get_preset(crf))
    out: np.ndarray = keys.astype(np.uint8)[refined]
    return out
