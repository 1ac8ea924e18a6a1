"""Attention fusion: one weight per (layer, head) attention map of the CAM model.

The CAM model captures L layers x H heads post-softmax maps and fuses them into one map as the
weighted mean `A_w = mean_k w_k A_k` (docs/method.md, phase 1). Map k = layer * H + head
(layer-major; the reference stacks head-major, `weaktr_cli.models.reference` permutes its
weights).

Variants (`FUSIONS`):

- ``"aaf"`` (paper / reference V1): global pool (avg or max) of each whole N x N map -> K-vector
  -> Linear(K, K // r, no bias) -> ReLU -> Linear(K // r, K, no bias) -> sigmoid.
  Average pooling of a softmax map is exactly 1/N, so with ``pool="avg"`` the weights do not
  depend on the image: they are learned static head weights (the paper's Table 9).
- ``"aaf-feat"`` (reference V3, the released checkpoint): each head's attention-branch output
  (after `proj`, before the residual) is pooled over tokens; head h of a layer takes channels
  h, h + H, h + 2H, ... (the reference's `view(..., D // H, H)` grouping: after `proj` channels
  are not tied to heads, so this strided split is a convention kept for checkpoint
  compatibility) -> Linear(D/H, D/H // fr) -> Linear(., 1) (no activation between) -> the same
  head FFN -> sigmoid.
- ``"aaf-rand"`` (the paper's random-weight ablation, Table 4; reference
  `AAF_RandWeight`, hustvl/WeakTr 0ff9d9a AAF.py:47-57): a fixed random K-vector (drawn once
  from the global RNG, kept as the buffer `query` so it is saved with the model) -> the same
  head FFN -> sigmoid. The weights are learned but never see the image.
- ``"mean-sum"`` (MCTformer baseline): all weights 1.

The head FFN's hidden width is int(K / r); r may be fractional (the reference's `--reduction`
is a float, its hidden-dimension ablation, Table 8).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from weaktr_cli.errors import WeakTrError

__all__ = [
    "FUSIONS",
    "FUSION_DEFAULTS",
    "POOLS",
    "AttentionFusion",
    "FeatureFusion",
    "MeanSumFusion",
    "PooledAttentionFusion",
    "RandomQueryFusion",
    "build_fusion",
    "weighted_mean_attention",
]

#: fusion -> the (pooling, head-FFN reduction) it trains with unless told otherwise: the
#: paper's AAF (V1) avg and 4, the released checkpoint's aaf-feat (V3) max and 8.
FUSION_DEFAULTS: dict[str, tuple[str, float]] = {
    "aaf": ("avg", 4), "aaf-feat": ("max", 8), "aaf-rand": ("avg", 4), "mean-sum": ("avg", 4)}
FUSIONS = tuple(FUSION_DEFAULTS)
POOLS = ("avg", "max")


class AttentionFusion(nn.Module):
    """Base class of the variants below.

    Each variant's `forward(maps, feats)` takes L per-layer attention maps (B, H, N, N) and L
    attention-branch outputs (B, N, D) and returns float weights (B, L*H), layer-major.
    """

    #: True when `forward` needs the attention-branch outputs (`feats`)
    needs_features: bool = False

    def __init__(self, depth: int, num_heads: int) -> None:
        super().__init__()
        self.depth = depth
        self.num_heads = num_heads

    @property
    def num_maps(self) -> int:
        return self.depth * self.num_heads

    def weights_from_rows(self, feats: Sequence[Tensor], n_tokens: int, like: Tensor
                          ) -> Tensor | None:
        """The weights `forward` gives, from what a pass that kept only some rows of each
        attention map still knows (the branch outputs and the token count N), or None when
        whole maps are needed. `like` gives the batch size, dtype and device."""
        return None


def _head_ffn(num_maps: int, reduction: float) -> nn.Sequential:
    # int(K / r) as the reference (AAF.py:13); equals K // r for integer r.
    hidden = int(num_maps / reduction) if reduction > 0 else 0
    if hidden < 1:
        raise WeakTrError(
            f"AAF reduction {reduction} leaves no hidden units for {num_maps} attention maps",
            hint=f"use a reduction between 1 and {num_maps}",
        )
    return nn.Sequential(
        nn.Linear(num_maps, hidden, bias=False),
        nn.ReLU(),
        nn.Linear(hidden, num_maps, bias=False),
        nn.Sigmoid(),
    )


def _check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise WeakTrError(
            f"unknown AAF pooling {pool!r}", hint=f"choose one of: {', '.join(POOLS)}"
        )
    return pool


class MeanSumFusion(AttentionFusion):
    """The MCTformer baseline: every map weighs 1 (a plain mean of all L*H maps)."""

    def forward(self, maps: Sequence[Tensor], feats: Sequence[Tensor]) -> Tensor:
        first = maps[0]
        return first.new_ones(first.shape[0], self.num_maps)

    def weights_from_rows(self, feats: Sequence[Tensor], n_tokens: int, like: Tensor
                          ) -> Tensor | None:
        return like.new_ones(like.shape[0], self.num_maps)


class PooledAttentionFusion(AttentionFusion):
    """Paper AAF: pooled attention maps -> head FFN -> sigmoid (parameters `head_ffn.{0,2}`)."""

    def __init__(
        self, depth: int, num_heads: int, *, pool: str = "avg", reduction: float = 4
    ) -> None:
        super().__init__(depth, num_heads)
        self.pool = _check_pool(pool)
        self.reduction = reduction
        self.head_ffn = _head_ffn(self.num_maps, reduction)

    def forward(self, maps: Sequence[Tensor], feats: Sequence[Tensor]) -> Tensor:
        reduce = torch.mean if self.pool == "avg" else torch.amax
        pooled = torch.cat([reduce(m, dim=(-2, -1)) for m in maps], dim=1)  # (B, L*H)
        weights: Tensor = self.head_ffn(pooled)
        return weights

    def weights_from_rows(self, feats: Sequence[Tensor], n_tokens: int, like: Tensor
                          ) -> Tensor | None:
        if self.pool != "avg":
            return None
        # Each row of a softmax map sums to 1, so the map's mean is 1/N whatever it holds.
        pooled = like.new_full((like.shape[0], self.num_maps), 1.0 / n_tokens)
        weights: Tensor = self.head_ffn(pooled)
        return weights


class RandomQueryFusion(AttentionFusion):
    """Random-weight AAF: a fixed random query -> head FFN -> sigmoid (`query`, `head_ffn`)."""

    def __init__(self, depth: int, num_heads: int, *, reduction: float = 4) -> None:
        super().__init__(depth, num_heads)
        self.reduction = reduction
        self.register_buffer("query", torch.randn(1, self.num_maps))
        self.head_ffn = _head_ffn(self.num_maps, reduction)

    def forward(self, maps: Sequence[Tensor], feats: Sequence[Tensor]) -> Tensor:
        query = self.get_buffer("query")
        weights: Tensor = self.head_ffn(query.to(maps[0].dtype)).expand(maps[0].shape[0], -1)
        return weights


class FeatureFusion(AttentionFusion):
    """Reference V3 AAF from attention-branch outputs (parameters `feat_ffn.{0,1}`, `head_ffn`)."""

    needs_features = True

    def __init__(
        self,
        depth: int,
        num_heads: int,
        head_dim: int,
        *,
        pool: str = "max",
        reduction: float = 8,
        feat_reduction: int = 8,
    ) -> None:
        super().__init__(depth, num_heads)
        self.pool = _check_pool(pool)
        self.reduction = reduction
        self.feat_reduction = feat_reduction
        feat_hidden = head_dim // feat_reduction if feat_reduction > 0 else 0
        if feat_hidden < 1:
            raise WeakTrError(
                f"AAF feature reduction {feat_reduction} leaves no hidden units for "
                f"{head_dim}-dim head features",
                hint=f"use a feature reduction between 1 and {head_dim}",
            )
        self.head_dim = head_dim
        self.feat_ffn = nn.Sequential(nn.Linear(head_dim, feat_hidden), nn.Linear(feat_hidden, 1))
        self.head_ffn = _head_ffn(self.num_maps, reduction)

    def forward(self, maps: Sequence[Tensor], feats: Sequence[Tensor]) -> Tensor:
        per_layer = []
        for f in feats:
            b, _, d = f.shape
            pooled = f.mean(dim=1) if self.pool == "avg" else f.amax(dim=1)  # (B, D)
            # channel c = j * H + h belongs to head h (the reference's strided grouping)
            heads = pooled.reshape(b, d // self.num_heads, self.num_heads).transpose(1, 2)
            per_layer.append(self.feat_ffn(heads).squeeze(-1))  # (B, H)
        weights: Tensor = self.head_ffn(torch.cat(per_layer, dim=1))
        return weights

    def weights_from_rows(self, feats: Sequence[Tensor], n_tokens: int, like: Tensor
                          ) -> Tensor | None:
        return self.forward([], feats)  # the branch outputs alone decide


def build_fusion(
    name: str,
    *,
    depth: int,
    num_heads: int,
    head_dim: int,
    pool: str | None = None,
    reduction: float | None = None,
    feat_reduction: int = 8,
) -> AttentionFusion:
    """The fusion module `name` (one of `FUSIONS`) for a depth x num_heads backbone; `pool`
    and `reduction` default to the variant's (`FUSION_DEFAULTS`)."""
    if name not in FUSION_DEFAULTS:
        raise WeakTrError(f"unknown fusion {name!r}", hint=f"choose one of: {', '.join(FUSIONS)}")
    default_pool, default_reduction = FUSION_DEFAULTS[name]
    pool = default_pool if pool is None else pool
    reduction = default_reduction if reduction is None else reduction
    if name == "aaf":
        return PooledAttentionFusion(depth, num_heads, pool=pool, reduction=reduction)
    if name == "aaf-feat":
        return FeatureFusion(
            depth,
            num_heads,
            head_dim,
            pool=pool,
            reduction=reduction,
            feat_reduction=feat_reduction,
        )
    if name == "aaf-rand":
        return RandomQueryFusion(depth, num_heads, reduction=reduction)
    return MeanSumFusion(depth, num_heads)


def weighted_mean_attention(maps: Sequence[Tensor], weights: Tensor) -> Tensor:
    """`mean_k w_k A_k` over all L*H maps without stacking them (saves a (B, L*H, N, M) copy).

    maps: L tensors (B, H, N, M); weights: (B, L*H) layer-major. Returns (B, N, M).
    """
    num_heads = maps[0].shape[1]
    parts = (
        torch.einsum("bh,bhnm->bnm", weights[:, i * num_heads : (i + 1) * num_heads].to(m.dtype), m)
        for i, m in enumerate(maps)
    )
    return sum(parts, torch.zeros_like(maps[0][:, 0])) / (len(maps) * num_heads)
