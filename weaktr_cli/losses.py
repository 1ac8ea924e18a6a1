"""Losses for online retraining: WeakTr's gradient clipping loss and plain cross-entropy.

Both return a `ClipLossResult` so the training loop logs the same fields either way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from weaktr_cli.data.base import IGNORE_INDEX
from weaktr_cli.errors import WeakTrError

__all__ = ["ClipLossResult", "gradient_clipping_loss", "pixel_ce", "plain_ce_loss"]


class ClipLossResult(NamedTuple):
    """What a retraining loss returns. All tensors except `loss` are detached.

    loss: 0-dim float, differentiable; the mean over all B*H*W pixels (ignored ones count 0).
    global_mean: 0-dim float, the plain per-pixel CE mean over all pixels (the reference's
        `mean_loss`; compare it with tau).
    clipped_fraction: 0-dim float in [0, 1], the share of non-ignored pixels whose gradient was
        dropped (0 when there is no non-ignored pixel).
    kept_mask: (B, H, W) bool, True where a non-ignored pixel contributes a gradient; for
        diagnostics such as the precision of kept pseudo labels against ground truth.
    """

    loss: torch.Tensor
    global_mean: torch.Tensor
    clipped_fraction: torch.Tensor
    kept_mask: torch.Tensor


def pixel_ce(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Per-pixel cross-entropy (B, H, W), computed in at least float32; ignored pixels are 0.

    Args:
        logits: (B, C, H, W) float class scores.
        target: (B, H, W) integer class ids in [0, C) or `ignore_index`.
    """
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise WeakTrError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match",
            hint="expected logits (B, C, H, W) and target (B, H, W)",
        )
    # Half-precision logits (autocast) are upcast: the per-pixel losses feed thresholds.
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="none")


def plain_ce_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> ClipLossResult:
    """Cross-entropy averaged over all pixels, ignored pixels counted as 0 (as the reference).

    Same result type as `gradient_clipping_loss` (`--no-clip`): nothing is clipped, every
    non-ignored pixel is kept.

    Args:
        logits: (B, C, H, W) float class scores.
        target: (B, H, W) integer class ids in [0, C) or `ignore_index`.
    """
    pixel = pixel_ce(logits, target, ignore_index)
    loss = pixel.mean()
    return ClipLossResult(
        loss=loss,
        global_mean=loss.detach(),
        clipped_fraction=torch.zeros((), dtype=pixel.dtype, device=pixel.device),
        kept_mask=target != ignore_index,
    )


def gradient_clipping_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    tau: float = 1.2,
    patch_size: int = 120,
    ignore_index: int = IGNORE_INDEX,
) -> ClipLossResult:
    """WeakTr's gradient clipping loss (docs/method.md, phase 4; reference `GradientClipping`).

    1. l = per-pixel cross-entropy (B, H, W); ignored pixels have l = 0.
    2. g = mean of l over all B*H*W pixels, ignored ones included.
    3. If g > tau the loss is the plain mean of l (noisy early training: no clipping).
    4. Otherwise: m = mean of l over the batch, an (H, W) map; local means lambda_i of m over
       non-overlapping `patch_size` x `patch_size` patches; per-patch threshold
       t_i = max(lambda_i, g); each pixel's loss becomes min(l, t) with t detached, so a pixel
       above its threshold contributes the constant t and no gradient. The loss is the mean
       of the capped map over all B*H*W pixels.

    Decisions where the method is silent:

    - Partial patches: when H or W is not a multiple of `patch_size`, the patches tile the map
      from the top-left corner, and the last row/column of patches is smaller (for example
      H = 250, S = 120 gives patch rows of 120, 120 and 10 pixels). Each patch's local mean
      is over its actual pixels. (The reference only handles multiples: it trains on 480
      crops with S = 120.)
    - Ignored pixels enter the local means as zeros, counted in the denominator, as in the
      reference (they are 0 in the loss map it pools). A patch with many ignored pixels
      therefore has a lower local mean; its threshold never drops below g. Ignored pixels
      themselves are never clipped (0 <= g <= t) and carry no gradient either way.
    - A pixel exactly at its threshold keeps its gradient (the reference's clamp does too).

    The g > tau switch is a `torch.where` on an infinite threshold, not a Python branch, so
    the function never synchronises with the device.

    Args:
        logits: (B, C, H, W) float class scores.
        target: (B, H, W) integer class ids in [0, C) or `ignore_index` (255).
        tau: clipping starts once the global mean loss is at most tau (reference 1.2).
        patch_size: side S of the local-mean patches, in pixels (reference 120).
        ignore_index: label value that marks ignored pixels.

    Returns:
        `ClipLossResult` (see there).
    """
    if patch_size < 1:
        raise WeakTrError(
            f"the clipping patch size must be at least 1 pixel, got {patch_size}",
            hint="pass a positive patch size (the paper uses 120 for 480 px crops)",
        )
    pixel = pixel_ce(logits, target, ignore_index)
    valid = target != ignore_index
    detached = pixel.detach()
    global_mean = detached.mean()

    threshold = _patch_means(detached.mean(dim=0), patch_size)  # (H, W)
    threshold = torch.maximum(threshold, global_mean)
    # Above tau nothing is clipped: an infinite threshold keeps every pixel.
    threshold = torch.where(global_mean > tau, torch.full_like(threshold, torch.inf), threshold)
    threshold = threshold.expand_as(pixel)

    clipped = pixel.detach() > threshold
    # Where clipped, the value is the constant threshold: the pixel's gradient is exactly 0.
    capped = torch.where(clipped, threshold, pixel)
    clipped_valid = clipped & valid
    n_valid = valid.sum().clamp_min(1)
    return ClipLossResult(
        loss=capped.mean(),
        global_mean=global_mean,
        clipped_fraction=clipped_valid.sum().to(pixel.dtype) / n_valid.to(pixel.dtype),
        kept_mask=valid & ~clipped,
    )


def _patch_means(loss_map: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Mean of an (H, W) map over non-overlapping S x S patches, broadcast back to (H, W).

    Partial last patches average over their real pixels only.
    """
    height, width = loss_map.shape
    rows = -(-height // patch_size)
    cols = -(-width // patch_size)
    pad = (0, cols * patch_size - width, 0, rows * patch_size - height)
    sums = F.pad(loss_map, pad).reshape(rows, patch_size, cols, patch_size).sum(dim=(1, 3))
    ones = torch.ones_like(loss_map)
    counts = F.pad(ones, pad).reshape(rows, patch_size, cols, patch_size).sum(dim=(1, 3))
    means = sums / counts
    full = means.repeat_interleave(patch_size, dim=0).repeat_interleave(patch_size, dim=1)
    return full[:height, :width]
