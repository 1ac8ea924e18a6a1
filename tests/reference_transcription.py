"""An independent transcription of the reference's segmentation model and test-time procedure.

Written from reading hustvl/WeakTr (0ff9d9a; the same code at 3547b87) and kept apart from the
library on purpose: the tests compare weaktr's implementation against this one, so neither may
import the other's internals. Module attribute names follow the reference's classes, so
`RefSegmenter(...).state_dict()` has exactly the reference checkpoint's key names:

- OnlineRetraining/segm/model/vit.py:17-150 (PatchEmbedding, VisionTransformer),
- segm/model/blocks.py:19-98 (FeedForward, Attention, Block; nn.LayerNorm eps 1e-5),
- segm/model/decoder.py:37-207 (MaskTransformer, MultiMaskTransformer),
- segm/model/segmenter.py:63-92 (MultiSegmenter), segm/model/utils.py:22-217 (inference),
- segm/data/base.py:35-111 + mmseg Resize / MultiScaleFlipAug (test pipeline),
- segm/eval/miou.py:85-93, segm/eval/densecrf.py (fusion, CRF input, CRF).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# ----------------------------------------------------------------------------- model


class RefFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        weights = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # eps 1e-5: PyTorch's default, as the reference
        self.norm2 = nn.LayerNorm(dim)
        self.attn = RefAttention(dim, heads)
        self.mlp = RefFeedForward(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefPatchEmbedding(nn.Module):
    def __init__(self, image_size: int, patch: int, dim: int) -> None:
        super().__init__()
        self.grid_size = (image_size // patch, image_size // patch)
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, im: torch.Tensor) -> torch.Tensor:
        return self.proj(im).flatten(2).transpose(1, 2)


def ref_resize_pos_embed(posemb: torch.Tensor, old: tuple[int, int],
                         new: tuple[int, int]) -> torch.Tensor:
    """The reference's bilinear resampling of the patch positions (class token kept)."""
    tok, grid = posemb[:, :1], posemb[0, 1:]
    grid = grid.reshape(1, old[0], old[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bilinear")
    grid = grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1)
    return torch.cat([tok, grid], dim=1)


class RefVisionTransformer(nn.Module):
    def __init__(self, image_size: int, patch: int, depth: int, dim: int, heads: int) -> None:
        super().__init__()
        self.patch_size = patch
        self.patch_embed = RefPatchEmbedding(image_size, patch, dim)
        grid = image_size // patch
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, dim) * 0.02)
        self.blocks = nn.ModuleList([RefBlock(dim, heads, 4 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1000)  # ImageNet head, saved but unused by the segmenter

    def forward(self, im: torch.Tensor) -> torch.Tensor:
        b, _, h, w = im.shape
        x = self.patch_embed(im)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        pos = self.pos_embed
        if x.shape[1] != pos.shape[1]:
            new = (h // self.patch_size, w // self.patch_size)
            pos = ref_resize_pos_embed(pos, self.patch_embed.grid_size, new)
        x = x + pos
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class RefMultiMaskTransformer(nn.Module):
    def __init__(self, n_cls: int, patch: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.n_cls = n_cls
        self.patch_size = patch
        self.blocks = nn.ModuleList([RefBlock(dim, heads, 4 * dim) for _ in range(layers)])
        self.cls_emb = nn.Parameter(torch.randn(1, n_cls, dim) * 0.02)
        self.proj_dec = nn.Linear(dim, dim)
        self.proj_patch = nn.Parameter(dim**-0.5 * torch.randn(dim, dim))
        self.proj_classes = nn.Parameter(dim**-0.5 * torch.randn(dim, dim))
        self.decoder_norm = nn.LayerNorm(dim)
        self.mask_norm = nn.LayerNorm(n_cls)

    def masks(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        x = self.decoder_norm(x)
        patches = x[:, : -self.n_cls] @ self.proj_patch
        classes = x[:, -self.n_cls :] @ self.proj_classes
        patches = patches / patches.norm(dim=-1, keepdim=True)
        classes = classes / classes.norm(dim=-1, keepdim=True)
        m = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, P, n_cls)
        b, p, n = m.shape
        return m.reshape(b, rows, p // rows, n).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = size[0] // self.patch_size
        x = self.proj_dec(x)
        x = torch.cat((x, self.cls_emb.expand(x.shape[0], -1, -1)), 1)
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = self.blocks[-1](x)
        return self.masks(x, rows), self.masks(last, rows)


class RefSegmenter(nn.Module):
    """The reference's MultiSegmenter: forward -> (P1 logits, P2 logits) at the input size."""

    def __init__(self, *, n_cls: int, image_size: int, patch: int, depth: int, dim: int,
                 decoder_layers: int = 2) -> None:
        super().__init__()
        heads = dim // 64  # segm/config.yml n_heads and segm/model/factory.py:121
        self.n_cls = n_cls
        self.patch_size = patch
        self.encoder = RefVisionTransformer(image_size, patch, depth, dim, heads)
        self.decoder = RefMultiMaskTransformer(n_cls, patch, dim, decoder_layers, heads)

    def forward(self, im: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h0, w0 = im.shape[2:]
        p = self.patch_size
        im = F.pad(im, (0, (-w0) % p, 0, (-h0) % p), value=0)
        h, w = im.shape[2:]
        tokens = self.encoder(im)[:, 1:]
        outs = []
        for masks in self.decoder(tokens, (h, w)):
            up = F.interpolate(masks, size=(h, w), mode="bilinear")
            outs.append(up[:, :, :h0, :w0])
        return outs[0], outs[1]


# ----------------------------------------------------------------------------- test time

#: Rounded 0-255 statistics (segm/data/base.py:35-37 applied to segm/data/utils.py STATS).
DEIT_MEAN_255 = (123.68, 116.28, 103.53)
DEIT_STD_255 = (58.4, 57.12, 57.38)


def mmseg_resized_size(h: int, w: int, ratio: float, im_size: int,
                       max_ratio: int = 8) -> tuple[int, int]:
    """mmseg MultiScaleFlipAug scale (int(max_ratio*im_size*r), int(im_size*r)) + mmcv
    rescale_size: factor min(long/L, short/S); new sides int(x * factor + 0.5)."""
    long_edge, short_edge = int(max_ratio * im_size * ratio), int(im_size * ratio)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def cv2_like_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 bilinear resize with half-pixel centres, rounded (what cv2.INTER_LINEAR does,
    up to its fixed-point weights), written with numpy only."""
    h, w = image.shape[:2]
    out_h, out_w = size

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        lo = np.floor(src).astype(np.int64)
        lo = np.minimum(lo, n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (src - lo)

    y0, y1, fy = axis(h, out_h)
    x0, x1, fx = axis(w, out_w)
    img = image.astype(np.float64)
    top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
    bottom = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
    out = top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]
    # Round half up: the margin makes exact ties (weights of 1/2, 1/4) go up as in fixed point.
    return np.clip(np.floor(out + 0.5 + 1e-6), 0, 255).astype(np.uint8)


def ref_upsample_to_window(im: torch.Tensor, window: int) -> torch.Tensor:
    """segm/model/utils.py resize(): short side to `window` only if smaller, int() sides."""
    h, w = im.shape[2:]
    if h < w:
        h_res, w_res = window, (w / h) * window
    else:
        h_res, w_res = (h / w) * window, window
    if min(h, w) < window:
        return F.interpolate(im, (int(h_res), int(w_res)), mode="bilinear")
    return im


def ref_window_anchors(size: int, window: int, stride: int) -> list[int]:
    return [a for a in range(0, size, stride) if a < size - window] + [size - window]


def ref_inference(model: RefSegmenter, image: np.ndarray, *, ratios: tuple[float, ...],
                  flip: bool, im_size: int, window: int, stride: int,
                  mean255: tuple[float, ...], std255: tuple[float, ...],
                  weight: float = 0.8) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The fused 0.8 P1 + P2 map of one image (miou.py process_batch) and the pass sizes."""
    h0, w0 = image.shape[:2]
    mean = torch.tensor(mean255).view(1, 3, 1, 1)
    std = torch.tensor(std255).view(1, 3, 1, 1)
    maps = [torch.zeros(model.n_cls, h0, w0), torch.zeros(model.n_cls, h0, w0)]
    sizes = []
    views = 0
    for ratio in ratios:  # MultiScaleFlipAug: scale-major, then flip
        resized = cv2_like_resize(image, mmseg_resized_size(h0, w0, ratio, im_size))
        for flipped in ([False, True] if flip else [False]):
            img = resized[:, ::-1] if flipped else resized
            x = torch.from_numpy(img.astype(np.float32).copy()).permute(2, 0, 1)[None]
            x = ref_upsample_to_window((x - mean) / std, window)
            h, w = x.shape[2:]
            sizes.append((h, w))
            anchors = [(a, b) for a in ref_window_anchors(h, window, stride)
                       for b in ref_window_anchors(w, window, stride)]
            with torch.no_grad():
                outs = [model(x[:, :, a : a + window, b : b + window]) for a, b in anchors]
            for k in range(2):
                logit = torch.zeros(model.n_cls, h, w)
                count = torch.zeros(1, h, w)
                for (a, b), out in zip(anchors, outs, strict=True):
                    logit[:, a : a + window, b : b + window] += out[k][0]
                    count[:, a : a + window, b : b + window] += 1
                logit = F.interpolate((logit / count)[None], (h0, w0), mode="bilinear")[0]
                if flipped:
                    logit = torch.flip(logit, (2,))
                maps[k] += F.softmax(logit, 0)
            views += 1
    return weight * (maps[0] / views) + maps[1] / views, sizes


def ref_crf_input(fused: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(keys, planes): the classes present in the argmax and their un-normalised planes."""
    probs = fused.numpy()
    keys = np.unique(probs.argmax(0))
    return keys, probs[keys]


def ref_crf_labels(image: np.ndarray, fused: torch.Tensor, *, gaussian: tuple[float, float],
                   bilateral: tuple[float, float, float]) -> np.ndarray:
    """segm/eval/make_crf.py + densecrf.py: CRF on the restricted planes, argmax -> keys."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    keys, planes = ref_crf_input(fused)
    h, w = image.shape[:2]
    d = dcrf.DenseCRF2D(w, h, len(keys))
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(planes)))
    d.addPairwiseGaussian(sxy=gaussian[0], compat=gaussian[1])
    d.addPairwiseBilateral(sxy=bilateral[0], srgb=bilateral[1],
                           rgbim=np.ascontiguousarray(np.copy(image)), compat=bilateral[2])
    q = np.array(d.inference(10)).reshape((len(keys), h, w))
    return keys[np.argmax(q, axis=0)].astype(np.uint8)


def deit_small_key_shapes(n_cls: int = 21, crop: int = 480) -> dict[str, tuple[int, ...]]:
    """The parameter names and shapes of the released DeiT-S / ViT-S segmenters, spelled out
    from segm/model/{vit,blocks,decoder}.py (deit_small_patch16_224 / vit_small_patch16_384:
    width 384, depth 12, 6 heads, mlp 1536; 2 decoder layers)."""
    d, grid = 384, crop // 16
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.cls_token": (1, 1, d),
        "encoder.pos_embed": (1, grid * grid + 1, d),
        "encoder.patch_embed.proj.weight": (d, 3, 16, 16),
        "encoder.patch_embed.proj.bias": (d,),
        "encoder.norm.weight": (d,),
        "encoder.norm.bias": (d,),
        "encoder.head.weight": (1000, d),
        "encoder.head.bias": (1000,),
        "decoder.cls_emb": (1, n_cls, d),
        "decoder.proj_dec.weight": (d, d),
        "decoder.proj_dec.bias": (d,),
        "decoder.proj_patch": (d, d),
        "decoder.proj_classes": (d, d),
        "decoder.decoder_norm.weight": (d,),
        "decoder.decoder_norm.bias": (d,),
        "decoder.mask_norm.weight": (n_cls,),
        "decoder.mask_norm.bias": (n_cls,),
    }
    for prefix, depth in (("encoder", 12), ("decoder", 2)):
        for i in range(depth):
            b = f"{prefix}.blocks.{i}."
            shapes.update({
                b + "norm1.weight": (d,), b + "norm1.bias": (d,),
                b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
                b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
                b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,),
            })
    return shapes


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Give every parameter (LayerNorms included) random values, deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 / math.sqrt(p.shape[-1]) if p.ndim > 1 else 0.1
            base = 1.0 if name.endswith("weight") and p.ndim == 1 else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=gen))
    return model
