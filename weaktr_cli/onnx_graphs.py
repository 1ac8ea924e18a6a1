"""The modules `weaktr_cli.export` traces: a model taking raw 0-255 pixels, written for
`torch.export` with a symbolic batch, height and width.

- `SegmenterExport`: input ``pixels`` float32 (B, 3, H, W), RGB 0-255, not normalised (the
  checkpoint's mean/std are applied in the graph); output logits (B, n_cls, H, W), or every
  decoder layer's (B, L, n_cls, H, W).
- `CamExport`: the same input; output CAMs (B, C, H // p, W // p). It runs the model's own
  `WeakTrCAM.encode` / `cam_heads`; only the crop and the positional-embedding resampling
  are written differently, so that the exporter keeps the sizes symbolic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from weaktr_cli.errors import WeakTrError
from weaktr_cli.models.cam_vit import CAM_VARIANTS, WeakTrCAM, cam_maps
from weaktr_cli.models.segmenter import Segmenter
from weaktr_cli.settings import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["CamExport", "SegmenterExport"]


class _PixelNormalize(nn.Module):
    """float 0-255 RGB (B, 3, H, W) -> (x / 255 - mean) / std, as the torch pipelines do."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise WeakTrError(f"invalid normalisation mean {list(mean)} / std {list(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: Tensor) -> Tensor:
        mean, std = self.mean, self.std
        assert isinstance(mean, Tensor) and isinstance(std, Tensor)
        return (pixels / 255.0 - mean) / std


class SegmenterExport(nn.Module):
    """A `Segmenter` taking raw pixels: (B, 3, H, W) float32 RGB 0-255 -> logits.

    Returns (B, n_cls, H, W) float32 logits of the last decoder layer, or with `all_layers`
    (B, L, n_cls, H, W), the logits after every decoder layer (what `PredictSettings
    .layer_weights` mixes).
    """

    def __init__(
        self,
        model: Segmenter,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        *,
        all_layers: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, Segmenter):
            raise WeakTrError(f"expected a Segmenter, got {type(model).__name__}")
        self.model = model
        self.normalize = _PixelNormalize(mean, std)
        self.all_layers = all_layers

    def reference(self, pixels: Tensor) -> Tensor:
        """What the exported graph must compute: here the forward pass itself."""
        out: Tensor = self(pixels)
        return out

    def forward(self, pixels: Tensor) -> Tensor:
        images = self.normalize(pixels)
        if self.all_layers:
            return torch.stack(self.model.forward_layers(images), dim=1)
        logits: Tensor = self.model(images)
        return logits


_CUBIC_A = -0.75  # torch's bicubic kernel constant


def _cubic_matrix(out_len: Any, in_len: int, scale: Tensor) -> Tensor:
    """(out_len, in_len) float32 matrix of torch's bicubic resampling along one axis.

    `scale` is the 0-d input/output step; source coordinate = scale * (dst + 0.5) - 0.5,
    taps clamped to the border, A = -0.75, exactly as `F.interpolate(mode="bicubic",
    align_corners=False)`. Built from tensors so a symbolic `out_len` stays symbolic.
    """
    dst = torch.arange(out_len, dtype=torch.float32, device=scale.device)
    src = scale * (dst + 0.5) - 0.5
    first = torch.floor(src)
    t = src - first
    a = _CUBIC_A

    def near(x: Tensor) -> Tensor:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: Tensor) -> Tensor:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    columns = torch.arange(in_len, device=scale.device)
    matrix = torch.zeros((), device=scale.device)
    for k, weight in enumerate((far(t + 1), near(t), near(1 - t), far(2 - t))):
        tap = (first.long() + (k - 1)).clamp(0, in_len - 1)
        matrix = matrix + (tap[:, None] == columns[None, :]).float() * weight[:, None]
    return matrix


class CamExport(nn.Module):
    """A `WeakTrCAM` taking raw pixels: (B, 3, H, W) float32 RGB 0-255 -> CAMs (B, C, h, w).

    Same computation as `cam_maps(model, normalised images, variant)` (`reference`, which
    `export_onnx` compares onnxruntime with), written so that `torch.export` keeps batch, H
    and W symbolic:

    - the bottom/right remainder is cropped with `index_select` (slicing makes the exporter
      guard on whether the crop is a no-op and specialise the size);
    - the positional embedding is resampled by bicubic weight matrices built in the graph,
      with the reference's `scale_factor=(g + 0.1) / g0` steps, and the stored grid is used
      as is when the grid equals it (a tensor `where`, not a Python branch): the exporter
      would otherwise bake in the example's scale factor and the branch taken.

    Inputs need H, W >= 2 patches.
    """

    def __init__(
        self,
        model: WeakTrCAM,
        variant: str = "fine",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if not isinstance(model, WeakTrCAM):
            raise WeakTrError(f"expected a WeakTrCAM, got {type(model).__name__}")
        if variant not in CAM_VARIANTS:
            raise WeakTrError(
                f"unknown CAM variant {variant!r}", hint=f"choose one of: {', '.join(CAM_VARIANTS)}"
            )
        self.model = model
        self.variant = variant
        self.normalize = _PixelNormalize(mean, std)

    def reference(self, pixels: Tensor) -> Tensor:
        """What the exported graph must compute: `cam_maps` of the untouched model."""
        return cam_maps(self.model, self.normalize(pixels), self.variant)

    def _pos_embed(self, grid_h: Any, grid_w: Any) -> Tensor:
        model = self.model
        c = model.num_classes
        h0, w0 = model.base_grid
        dim = model.pos_embed.shape[-1]
        stored = model.pos_embed[:, c:].reshape(h0, w0, dim)
        gh = torch.full((), grid_h, dtype=torch.float64, device=stored.device)
        gw = torch.full((), grid_w, dtype=torch.float64, device=stored.device)
        same = (gh == h0) & (gw == w0)
        # A unit step is the identity resampling: the stored grid as is.
        step_h = torch.where(same, 1.0, h0 / (gh + 0.1)).float()
        step_w = torch.where(same, 1.0, w0 / (gw + 0.1)).float()
        rows = _cubic_matrix(grid_h, h0, step_h)
        cols = _cubic_matrix(grid_w, w0, step_w)
        patch = torch.einsum("ia,abd,jb->ijd", rows, stored, cols).reshape(1, -1, dim)
        return torch.cat([model.pos_embed[:, :c], patch], dim=1)

    def forward(self, pixels: Tensor) -> Tensor:
        model = self.model
        images = self.normalize(pixels)
        _, _, height, width = images.shape
        p = model.patch_size
        h, w = height // p, width // p
        rows = torch.arange(h * p, device=images.device)
        cols = torch.arange(w * p, device=images.device)
        cropped = images.index_select(2, rows).index_select(3, cols)
        patches = model.backbone.patch_embed(cropped)  # (B, h, w, D)
        tokens, record = model.encode(patches, self._pos_embed(h, w))
        maps = model.cam_heads(tokens, record, (h, w), upto=self.variant)
        if self.variant == "coarse":
            return maps.coarse.clamp(min=0)
        cam = maps.cross if self.variant == "cross" else maps.fine
        assert cam is not None
        return cam
