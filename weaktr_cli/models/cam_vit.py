"""The WeakTr CAM model: a plain ViT with C class tokens, a conv CAM head and attention fusion.

Forward pass (docs/method.md, phase 1), for images (B, 3, H, W) and C foreground classes:

1. Patch grid h x w = floor(H / p) x floor(W / p) (the bottom/right remainder is dropped, as
   the reference's strided conv does). Tokens = [C class tokens, P = h*w patch tokens].
2. Positional embedding: the C class-token embeddings plus the stored patch grid resampled to
   h x w. The resampling is the reference's (DINO style): bicubic, `align_corners=False`,
   `scale_factor=(h + 0.1) / h0` (not `size=`), no antialiasing, so CAMs at other input sizes
   match the reference. One deliberate difference: when the grid equals the stored grid we use
   the stored embedding as is, whereas the reference also resamples (a ~0.7 % coordinate shift)
   when H != W but both floor to the stored grid.
3. timm blocks; every block's post-softmax attention (B, H, N, N) is recorded by
   `WeakTrAttention` while `record_attention` is active. The final LayerNorm is never applied
   (the reference never applies it either).
4. Coarse CAM = Conv2d(D, C, 3, pad 1) on the last block's patch tokens, (B, C, h, w).
5. Fusion weights w (B, L*H) -> A_w = mean_k w_k A_k; cross attention A_w[:, :C, C:] -> (B, C,
   h, w); patch attention A_w[:, C:, C:] (B, P, P).
6. Cross CAM = cross * relu(coarse); fine CAM = patch_attn @ cross CAM (per class, over P).
   Like the reference, attention maps and the coarse CAM are detached in this branch by
   default (`detach_fine=True`), so the fine-CAM loss trains only the fusion weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention
from torch import Tensor, nn

from weaktr_cli.errors import WeakTrError
from weaktr_cli.models.fusion import (
    FUSION_DEFAULTS,
    FUSIONS,
    build_fusion,
    weighted_mean_attention,
)
from weaktr_cli.models.registry import ArchSpec, build_vit, get_arch
from weaktr_cli.settings import CAM_VARIANTS

__all__ = [
    "CAM_VARIANTS",
    "AttentionRecord",
    "CamOutputs",
    "WeakTrAttention",
    "WeakTrCAM",
    "cam_loss",
    "cam_maps",
    "record_attention",
    "resample_patch_pos_embed",
]

@dataclass
class AttentionRecord:
    """What `record_attention` collected during one forward pass, in block order."""

    #: post-softmax attention per block, (B, heads, N, N)
    maps: list[Tensor] = field(default_factory=list)
    #: attention-branch output per block (after proj, before the residual), (B, N, D)
    outputs: list[Tensor] = field(default_factory=list)
    keep_outputs: bool = False
    #: keep only the first `rows` query rows of each map (B, heads, rows, N) and compute the
    #: block output with fused attention: the class-token rows are all the cross CAM needs,
    #: and no (N, N) map is materialised (it dominated CPU inference, page faults included)
    rows: int | None = None


class WeakTrAttention(Attention):
    """timm `Attention` that computes the softmax explicitly while a record is attached.

    Same parameters (and checkpoint keys) as timm's class. With no record attached it is
    exactly timm's forward (fused attention where available).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.record: AttentionRecord | None = None

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        record = self.record
        if record is None:
            plain: Tensor = super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
            return plain
        if attn_mask is not None or is_causal or getattr(self, "gate", None) is not None:
            raise WeakTrError("attention recording supports plain (unmasked, ungated) attention")
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if record.rows is None:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            record.maps.append(attn)
            mixed = self.attn_drop(attn) @ v
        else:
            rows = q[:, :, : record.rows]
            record.maps.append(((rows * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
            mixed = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        mixed = mixed.transpose(1, 2).reshape(b, n, self.attn_dim)
        out: Tensor = self.proj_drop(self.proj(self.norm(mixed)))
        if record.keep_outputs:
            record.outputs.append(out)
        return out


@contextmanager
def record_attention(
    blocks: Iterable[nn.Module], keep_outputs: bool = False, rows: int | None = None
) -> Iterator[AttentionRecord]:
    """Attach one `AttentionRecord` to every block's `WeakTrAttention`; always detach it on exit.

    The record is released even when the forward pass raises, so nothing keeps tensors alive
    or changes later forwards.
    """
    modules = [getattr(blk, "attn", None) for blk in blocks]
    attns = [m for m in modules if isinstance(m, WeakTrAttention)]
    if len(attns) != len(modules):
        raise WeakTrError("attention recording needs blocks built with attn_layer=WeakTrAttention")
    record = AttentionRecord(keep_outputs=keep_outputs, rows=rows)
    try:
        for m in attns:
            m.record = record
        yield record
    finally:
        for m in attns:
            m.record = None


def resample_patch_pos_embed(
    patch_pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> Tensor:
    """Resample a patch pos-embed (1, h0*w0, D) to (1, h*w, D) as the reference does.

    Bicubic, align_corners=False, no antialiasing, with DINO's `scale_factor=(g + 0.1) / g0`
    (the +0.1 guards the floor() of the output size against float error).
    """
    (h0, w0), (h, w) = old_grid, new_grid
    dim = patch_pos.shape[-1]
    grid = patch_pos.reshape(1, h0, w0, dim).permute(0, 3, 1, 2)
    if grid.dtype not in (torch.float32, torch.float64):
        grid = grid.float()  # bicubic interpolation needs at least float32
    out = F.interpolate(
        grid,
        scale_factor=((h + 0.1) / h0, (w + 0.1) / w0),
        mode="bicubic",
        align_corners=False,
    ).to(patch_pos.dtype)
    if out.shape[-2:] != (h, w):
        raise WeakTrError(
            f"positional embedding resampling gave {tuple(out.shape[-2:])}, not {(h, w)}"
        )
    return out.permute(0, 2, 3, 1).reshape(1, h * w, dim)


@dataclass
class CamOutputs:
    """What `WeakTrCAM.forward` returns; all float tensors, C = foreground classes.

    The maps are filled only with `with_maps=True`. `coarse_cam` is the raw conv output (may be
    negative); `cross_cam` = cross attention * relu(coarse) and `fine_cam` = patch attention @
    cross_cam are non-negative. `head_weights` are the fusion weights, layer-major
    (index layer * heads + head).
    """

    token_logits: Tensor  # (B, C): last-block class tokens averaged over channels
    coarse_logits: Tensor  # (B, C): GAP of the coarse CAM
    fine_logits: Tensor  # (B, C): GAP of the fine CAM
    coarse_cam: Tensor | None = None  # (B, C, h, w)
    cross_cam: Tensor | None = None  # (B, C, h, w)
    fine_cam: Tensor | None = None  # (B, C, h, w)
    head_weights: Tensor | None = None  # (B, L*H)


class CamMaps(NamedTuple):
    """`WeakTrCAM.cam_heads`' maps at the patch grid (C = foreground classes)."""

    coarse: Tensor  # (B, C, h, w) raw conv output
    weights: Tensor | None = None  # (B, L*H) fusion weights
    cross: Tensor | None = None  # (B, C, h, w) cross attention * relu(coarse)
    fine: Tensor | None = None  # (B, C, h, w) patch attention @ cross


class WeakTrCAM(nn.Module):
    """WeakTr's CAM network on a timm ViT (see the module docstring for the forward pass).

    Args:
        arch: an `ArchSpec` or a registered name (`weaktr_cli.models.registry`).
        num_classes: C, the number of foreground classes (VOC 20, COCO 80/90).
        fusion: "aaf" (paper), "aaf-feat" (reference V3), "aaf-rand" (random-query
            ablation) or "mean-sum" (baseline).
        aaf_pool: "avg" or "max" pooling inside the fusion; default the variant's recipe
            ("aaf": "avg" as in the paper, "aaf-feat": "max" as the released checkpoint).
        aaf_reduction: r of the head FFN, hidden = int(L*H / r), r may be fractional; default
            4 for "aaf" (DeiT-S: 72 / 4 = 18) and 8 for "aaf-feat" (72 / 8 = 9).
        aaf_feat_reduction: reduction of the "aaf-feat" per-head feature FFN (64 -> 8).
        detach_fine: detach attention and coarse CAM in the fine branch (reference behaviour).
        drop_path_rate: stochastic depth of the backbone (the reference trains with 0.1).

    Parameters: `backbone.patch_embed.*`, `backbone.blocks.*` (timm names), `cls_token`
    (1, C, D), `pos_embed` (1, C + h0*w0, D), `head` (the conv), `fusion.*`.
    """

    def __init__(
        self,
        arch: ArchSpec | str,
        num_classes: int,
        *,
        fusion: str = "aaf",
        aaf_pool: str | None = None,
        aaf_reduction: float | None = None,
        aaf_feat_reduction: int = 8,
        detach_fine: bool = True,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        spec = get_arch(arch) if isinstance(arch, str) else arch
        if num_classes < 1:
            raise WeakTrError(
                f"a CAM model needs at least one class, got num_classes={num_classes}"
            )
        if fusion not in FUSIONS:
            raise WeakTrError(
                f"unknown fusion {fusion!r}", hint=f"choose one of: {', '.join(FUSIONS)}"
            )
        self.arch = spec
        self.num_classes = num_classes
        self.fusion_name = fusion
        recipe_pool, recipe_reduction = FUSION_DEFAULTS[fusion]
        self.aaf_pool = aaf_pool if aaf_pool is not None else recipe_pool
        self.aaf_reduction = aaf_reduction if aaf_reduction is not None else recipe_reduction
        self.aaf_feat_reduction = aaf_feat_reduction
        self.detach_fine = detach_fine
        self.drop_path_rate = drop_path_rate
        self.base_grid = spec.grid_size

        # The backbone keeps only timm's patch embedding and blocks: class tokens and their
        # positional embeddings are ours, because timm's ViT has a single class token.
        self.backbone = build_vit(
            spec,
            class_token=False,
            global_pool="",
            pos_embed="none",
            final_norm=False,
            attn_layer=WeakTrAttention,
            drop_path_rate=drop_path_rate,
        )
        dim = spec.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, num_classes, dim))
        self.pos_embed = nn.Parameter(
            torch.zeros(1, num_classes + self.base_grid[0] * self.base_grid[1], dim)
        )
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.head = nn.Conv2d(dim, num_classes, kernel_size=3, padding=1)
        self.fusion = build_fusion(
            fusion,
            depth=spec.depth,
            num_heads=spec.num_heads,
            head_dim=spec.head_dim,
            pool=self.aaf_pool,
            reduction=self.aaf_reduction,
            feat_reduction=aaf_feat_reduction,
        )

    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments; `WeakTrCAM.from_config(model.config())` rebuilds it."""
        return {
            "arch": dataclasses.asdict(self.arch),
            "num_classes": self.num_classes,
            "fusion": self.fusion_name,
            "aaf_pool": self.aaf_pool,
            "aaf_reduction": self.aaf_reduction,
            "aaf_feat_reduction": self.aaf_feat_reduction,
            "detach_fine": self.detach_fine,
            "drop_path_rate": self.drop_path_rate,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> WeakTrCAM:
        """Rebuild a (randomly initialised) model from `config()`; load weights afterwards."""
        cfg = dict(config)
        arch = cfg.pop("arch")
        spec = ArchSpec(**arch) if isinstance(arch, dict) else get_arch(arch)
        return cls(spec, **cfg)

    @property
    def patch_size(self) -> int:
        return self.arch.patch_size

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (h, w) for an input of height x width pixels: floor division by the patch."""
        p = self.arch.patch_size
        if height < p or width < p:
            raise WeakTrError(f"input {height}x{width} is smaller than one {p}x{p} patch")
        return height // p, width // p

    def _pos_embed_for(self, grid: tuple[int, int]) -> Tensor:
        if grid == self.base_grid:
            return self.pos_embed
        c = self.num_classes
        patch = resample_patch_pos_embed(self.pos_embed[:, c:], self.base_grid, grid)
        return torch.cat([self.pos_embed[:, :c], patch], dim=1)

    def encode(self, patches: Tensor, pos_embed: Tensor, rows: int | None = None
               ) -> tuple[Tensor, AttentionRecord]:
        """Class tokens + embedded patches (B, h, w, D) through the blocks, with `pos_embed`
        (1, C + h * w, D) added: the tokens (B, C + h * w, D) and the recorded attention (only
        the first `rows` query rows of each map, if given)."""
        b = patches.shape[0]
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), patches.flatten(1, 2)], dim=1)
        tokens = self.backbone.pos_drop(tokens + pos_embed)
        with record_attention(self.backbone.blocks, self.fusion.needs_features, rows) as record:
            tokens = self.backbone.blocks(tokens)
        return tokens, record

    def _encode(self, images: Tensor, rows: int | None = None
                ) -> tuple[Tensor, AttentionRecord, tuple[int, int]]:
        """Tokens after the blocks (B, C + h*w, D), the attention record and the grid (h, w)."""
        if images.ndim != 4:
            raise WeakTrError(f"expected images (B, 3, H, W), got shape {tuple(images.shape)}")
        _, _, height, width = images.shape
        h, w = self.grid_for(height, width)
        p = self.arch.patch_size
        patches = self.backbone.patch_embed(images[:, :, : h * p, : w * p])  # (B, h, w, D)
        tokens, record = self.encode(patches, self._pos_embed_for((h, w)), rows)
        return tokens, record, (h, w)

    def cross_cams(self, images: Tensor) -> tuple[Tensor, Tensor] | None:
        """(coarse_cam, cross_cam), each (B, C, h, w), as `forward(with_maps=True)` gives them
        up to float rounding, without ever forming an (N, N) attention map; None when the
        fusion needs whole maps (max-pooled AAF). For inference of the coarse and cross CAMs.
        """
        c = self.num_classes
        tokens, record, (h, w) = self._encode(images, rows=c)
        weights = self.fusion.weights_from_rows(record.outputs, tokens.shape[1], tokens)
        if weights is None:
            return None
        coarse = self.head(tokens[:, c:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w))
        cross = weighted_mean_attention([m[..., c:] for m in record.maps], weights)
        return coarse, cross.reshape(cross.shape[0], c, h, w) * F.relu(coarse)

    def cam_heads(self, tokens: Tensor, record: AttentionRecord, grid: tuple[Any, Any],
                  upto: str = "fine") -> CamMaps:
        """The CAMs of `encode`'s output (whole attention maps) on an (h, w) patch grid,
        computed up to the `upto` variant ("coarse", "cross" or "fine"; later maps None)."""
        b, (h, w), c = tokens.shape[0], grid, self.num_classes
        feat = tokens[:, c:].transpose(1, 2).reshape(b, -1, h, w)
        coarse = self.head(feat)
        if upto == "coarse":
            return CamMaps(coarse)
        maps, feats = record.maps, record.outputs
        coarse_src = coarse
        if self.detach_fine:
            maps = [m.detach() for m in maps]
            feats = [f.detach() for f in feats]
            coarse_src = coarse.detach()
        weights = self.fusion(maps, feats)  # (B, L*H)
        # only the columns of patch tokens are ever used: rows :C -> cross, rows C: -> patch
        fused = weighted_mean_attention([m[..., c:] for m in maps], weights)  # (B, N, P)
        cross_cam = fused[:, :c].reshape(b, c, h, w) * F.relu(coarse_src)
        if upto == "cross":
            return CamMaps(coarse, weights, cross_cam)
        patch_attn = fused[:, c:]  # (B, P, P)
        fine = torch.einsum("bpq,bcq->bcp", patch_attn, cross_cam.flatten(2)).reshape(b, c, h, w)
        return CamMaps(coarse, weights, cross_cam, fine)

    def forward(self, images: Tensor, with_maps: bool = False) -> CamOutputs:
        """images: (B, 3, H, W) float, normalised. Returns `CamOutputs` (maps if `with_maps`)."""
        tokens, record, grid = self._encode(images)
        maps = self.cam_heads(tokens, record, grid)
        assert maps.fine is not None
        token_logits = tokens[:, : self.num_classes].mean(dim=-1)
        outputs = CamOutputs(token_logits, maps.coarse.mean(dim=(2, 3)),
                             maps.fine.mean(dim=(2, 3)))
        if with_maps:
            outputs.coarse_cam = maps.coarse
            outputs.cross_cam = maps.cross
            outputs.fine_cam = maps.fine
            outputs.head_weights = maps.weights
        return outputs


def cam_loss(outputs: CamOutputs, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Sum of three multi-label soft-margin losses (equal weights), and the parts.

    targets: (B, C) multi-hot float. Returns (total, {"token": ..., "coarse": ..., "fine": ...}),
    all scalar tensors.
    """
    if targets.shape != outputs.token_logits.shape:
        raise WeakTrError(
            f"label shape {tuple(targets.shape)} does not match logits "
            f"{tuple(outputs.token_logits.shape)}",
            hint="targets must be (batch, num_classes) multi-hot vectors",
        )
    targets = targets.to(outputs.token_logits.dtype)
    parts = {
        "token": F.multilabel_soft_margin_loss(outputs.token_logits, targets),
        "coarse": F.multilabel_soft_margin_loss(outputs.coarse_logits, targets),
        "fine": F.multilabel_soft_margin_loss(outputs.fine_logits, targets),
    }
    return parts["token"] + parts["coarse"] + parts["fine"], parts


def cam_maps(model: WeakTrCAM, images: Tensor, variant: str = "fine") -> Tensor:
    """Class activation maps (B, C, h, w) float at the patch grid, one of `CAM_VARIANTS`.

    "fine": patch attention @ (cross attention * relu(coarse)) (the reference's CAM);
    "cross": cross attention * relu(coarse) (before patch-attention refinement);
    "coarse": relu(coarse conv CAM). Runs in the model's current mode and grad state (wrap in
    `torch.inference_mode()` for inference).
    """
    if variant not in CAM_VARIANTS:
        raise WeakTrError(
            f"unknown CAM variant {variant!r}", hint=f"choose one of: {', '.join(CAM_VARIANTS)}"
        )
    if variant != "fine" and not model.training:
        fast = model.cross_cams(images)
        if fast is not None:
            coarse, cross = fast
            return coarse.clamp(min=0) if variant == "coarse" else cross
    out: CamOutputs = model(images, with_maps=True)
    maps = {"fine": out.fine_cam, "cross": out.cross_cam, "coarse": out.coarse_cam}
    cam = maps[variant]
    assert cam is not None  # with_maps=True fills every map
    return cam.clamp(min=0) if variant == "coarse" else cam
