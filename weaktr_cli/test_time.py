"""The reference's test-time procedure, step for step (docs/REPRODUCING.md, "Test time").

For each ratio r (single scale: 1.0; multi-scale: 0.5, 0.75, 1.0, 1.25, 1.5, 1.75) and, with
`flip`, the mirrored image (hustvl/WeakTr 0ff9d9a OnlineRetraining/segm/data/base.py:92-111):

1. the uint8 image is resized bilinearly to short side int(im_size * r), sides rounded
   int(x + 0.5) (mmseg `Resize(keep_ratio=True)`; `windows.reference_pass_sizes`), mirrored,
   and normalised on 0-255 values with the statistics rounded to 2 decimals
   (segm/data/base.py:35-37: DeiT 123.68/116.28/103.53 and 58.4/57.12/57.38);
2. the normalised image is upsampled bilinearly to short side `window` only if its short side
   is smaller (segm/model/utils.py:106-118);
3. `window` crops at `stride`, the last anchored at the border, are run and their logits
   averaged where they overlap (utils.py:121-153);
4. each decoder output's merged logits are interpolated straight to the original size,
   un-mirrored and softmaxed (utils.py:154-161); every layer's probabilities are averaged over
   the views (utils.py:165-217);
5. the layers are fused as sum_k w_k P_k without renormalising: 0.8 P1 + P2 with a 2-layer
   decoder (segm/eval/miou.py:85).

The CRF input is this fused map restricted to the classes present in its argmax
(`dense_crf.label_from_probs(..., renormalize=False)`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from weaktr_cli.models.segmenter import Segmenter
from weaktr_cli.runtime import autocast
from weaktr_cli.windows import reference_pass_sizes, window_starts

__all__ = ["REFERENCE_RATIOS", "fuse_layers", "reference_layer_probs", "resize_uint8_bilinear",
           "sliding_logits"]

#: mmseg's multi-scale ratios in the reference (segm/data/base.py:93-100).
REFERENCE_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def resize_uint8_bilinear(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (1, 3, H, W) 0-255 values back onto the uint8 grid, as cv2 does.

    Half-pixel centres, no antialiasing, results rounded half up (in float64, with a 1e-6
    margin so exact ties round up as cv2's fixed point does) and clipped to 0-255. Returns
    float32. cv2 weights with 11-bit fixed-point coefficients, so a few pixels may differ from
    it by one level.
    """
    if tuple(pixels.shape[-2:]) == size:
        return pixels.float()
    out = F.interpolate(pixels.double(), size=size, mode="bilinear", align_corners=False)
    return torch.floor(out + (0.5 + 1e-6)).clamp_(0, 255).float()


def sliding_logits(model: Segmenter, image: torch.Tensor, window: int, stride: int,
                   batch_size: int, precision: str, layers: Sequence[int]) -> list[torch.Tensor]:
    """Merged window logits of a (1, 3, H, W) normalised image with H, W >= window.

    Returns one float32 (n_cls, H, W) tensor per index in `layers` (decoder layer indices):
    every window's logits summed into place and divided by the number of windows covering
    each pixel.
    """
    _, _, h, w = image.shape
    device = image.device
    boxes = [(y, x) for y in window_starts(h, window, stride)
             for x in window_starts(w, window, stride)]
    sums = [torch.zeros(model.n_cls, h, w, device=device) for _ in layers]
    count = torch.zeros(1, h, w, device=device)
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start : start + batch_size]
        crops = torch.cat([image[:, :, y : y + window, x : x + window] for y, x in chunk])
        with autocast(device, precision):
            outs = model(crops, return_layers=True)
        for k, layer in enumerate(layers):
            logits = outs[layer].float()
            for i, (y, x) in enumerate(chunk):
                sums[k][:, y : y + window, x : x + window] += logits[i]
        for y, x in chunk:
            count[:, y : y + window, x : x + window] += 1
    return [s / count for s in sums]


@torch.inference_mode()
def reference_layer_probs(
    model: Segmenter,
    image: np.ndarray,
    *,
    ratios: Sequence[float],
    flip: bool,
    im_size: int,
    window: int,
    stride: int,
    mean: Sequence[float],
    std: Sequence[float],
    layers: Sequence[int],
    batch_size: int = 4,
    precision: str = "fp32",
) -> torch.Tensor:
    """Per-layer class probabilities of one image, averaged over the reference's views.

    Args:
        model: a Segmenter in eval mode, on the device to run on.
        image: RGB (H, W, 3) uint8.
        mean, std: the normalisation on 0-1 values (multiplied by 255 here).
        layers: decoder layer indices to return (e.g. (0, 1) for P1, P2 of 2 layers).

    Returns:
        float32 (len(layers), n_cls, H, W) on the model's device.
    """
    device = next(model.parameters()).device
    h, w = image.shape[:2]
    mean255 = torch.tensor([255.0 * m for m in mean], device=device).view(1, 3, 1, 1)
    std255 = torch.tensor([255.0 * s for s in std], device=device).view(1, 3, 1, 1)
    pixels = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None]
    pixels = pixels.float()
    total = torch.zeros(len(layers), model.n_cls, h, w, device=device)
    views = 0
    for ratio in ratios:
        resized_size, fitted_size = reference_pass_sizes(h, w, ratio, im_size, window)
        resized = resize_uint8_bilinear(pixels, resized_size)
        for flipped in (False, True) if flip else (False,):
            view = resized.flip(-1) if flipped else resized
            view = (view - mean255) / std255
            if fitted_size != resized_size:
                view = F.interpolate(view, size=fitted_size, mode="bilinear",
                                     align_corners=False)
            merged = sliding_logits(model, view, window, stride, batch_size, precision, layers)
            for k, logits in enumerate(merged):
                up = F.interpolate(logits[None], size=(h, w), mode="bilinear",
                                   align_corners=False)[0]
                if flipped:
                    up = up.flip(-1)
                total[k] += up.softmax(dim=0)
            views += 1
    return total / views


def fuse_layers(layer_probs: torch.Tensor, weights: Sequence[float],
                normalize: bool = False) -> torch.Tensor:
    """sum_k weights[k] * layer_probs[k]; divided by sum(weights) when `normalize` (weaktr's
    default) and left as is otherwise (the reference's 0.8 P1 + P2 reaches 1.8)."""
    fused = sum((wk * p for wk, p in zip(weights, layer_probs, strict=True)),
                torch.zeros_like(layer_probs[0]))
    return fused / sum(weights) if normalize else fused
