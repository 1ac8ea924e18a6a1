"""Retraining augmentation: rescale, crop, flip, photometric distortion, normalise, pad."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from weaktr_cli.data.base import IGNORE_INDEX
from weaktr_cli.data.loader import to_tensor
from weaktr_cli.settings import RetrainConfig

__all__ = ["augment"]


def _photometric(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """mmseg-style PhotoMetricDistortion on (3, H, W) float in [0, 255].

    Each step with probability 1/2: brightness +-32, contrast x[0.5, 1.5] (before or after the
    colour steps, at random), saturation x[0.5, 1.5], hue +-18/180 of the circle.
    """
    from torchvision.transforms.v2 import functional as TF

    def coin() -> bool:
        return bool(rng.integers(2))

    if coin():
        img = (img + float(rng.uniform(-32, 32))).clamp_(0, 255)
    contrast_first = coin()
    contrast = float(rng.uniform(0.5, 1.5)) if coin() else None
    if contrast_first and contrast is not None:
        img = (img * contrast).clamp_(0, 255)
    unit = img / 255.0
    if coin():
        unit = TF.adjust_saturation(unit, float(rng.uniform(0.5, 1.5))).clamp_(0, 1)
    if coin():
        unit = TF.adjust_hue(unit, float(rng.integers(-18, 19)) / 180.0)
    img = unit * 255.0
    if not contrast_first and contrast is not None:
        img = (img * contrast).clamp_(0, 255)
    return img


def _crop_box(
    label: np.ndarray, crop: int, rng: np.random.Generator, cat_max_ratio: float
) -> tuple[int, int]:
    """Top-left corner of a crop (mmseg RandomCrop with cat_max_ratio, 10 tries)."""
    h, w = label.shape
    margin_h, margin_w = max(h - crop, 0), max(w - crop, 0)
    # With no margin every try is the same window: check it once (same draws, same result).
    check_once = cat_max_ratio < 1.0 and not (margin_h or margin_w)
    whole_ok = _varied_enough(label, cat_max_ratio) if check_once else False
    y = x = 0
    for _ in range(10):
        y = int(rng.integers(margin_h + 1))
        x = int(rng.integers(margin_w + 1))
        if cat_max_ratio >= 1.0:
            break
        ok = whole_ok if check_once else _varied_enough(label[y : y + crop, x : x + crop],
                                                        cat_max_ratio)
        if ok:
            break
    return y, x


def _varied_enough(window: np.ndarray, cat_max_ratio: float) -> bool:
    """Whether no class covers `cat_max_ratio` or more of the window's labelled pixels."""
    counts = np.bincount(window[window != IGNORE_INDEX].ravel(), minlength=1)
    counts = counts[counts > 0]
    return bool(len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio)


def augment(
    image: np.ndarray,
    labels: np.ndarray,
    config: RetrainConfig,
    rng: np.random.Generator,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training sample: rescale, crop, flip, photometric distortion, normalise, pad.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: (L, H, W) uint8 label maps moved with the image (seeds, and the ground truth
            when there is one); the first one steers the crop choice.

    Returns:
        image (3, S, S) float32 normalised (padding 0) and labels (L, S, S) uint8 (padding 255),
        S = config.crop_size.
    """
    crop = config.crop_size
    h, w = image.shape[:2]
    lo, hi = config.scale_range
    short = float(rng.uniform(lo, hi)) * crop
    scale = short / min(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    img = to_tensor(image).float()
    lab = torch.from_numpy(np.ascontiguousarray(labels))
    if size != (h, w):
        img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
        lab = F.interpolate(lab[None].float(), size=size, mode="nearest-exact")[0].to(torch.uint8)
    y, x = _crop_box(lab[0].numpy(), crop, rng, config.cat_max_ratio)
    img = img[:, y : y + crop, x : x + crop]
    lab = lab[:, y : y + crop, x : x + crop]
    if config.flip and rng.integers(2):
        img, lab = img.flip(-1), lab.flip(-1)
    if config.photometric:
        img = _photometric(img.clamp(0, 255), rng)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    img = (img / 255.0 - m) / s
    ph, pw = crop - img.shape[1], crop - img.shape[2]
    if ph or pw:
        img = F.pad(img, (0, pw, 0, ph), value=0.0)
        lab = F.pad(lab, (0, pw, 0, ph), value=IGNORE_INDEX)
    return img.contiguous(), lab.contiguous()
