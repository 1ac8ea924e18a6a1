"""Official hustvl/WeakTr CAM checkpoints -> `WeakTrCAM`, with strict key checks.

The reference saves `{"model": state_dict, "epoch": ..., "miou": ...}` from its `WeakTr`
class (a DeiT with C class tokens). Shared keys, all layouts:

    cls_token (1, C, D)               pos_embed (1, C + h0*w0, D)
    patch_embed.proj.{weight,bias}    blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*
    norm.{weight,bias}                (final LayerNorm: present but never applied -> dropped)
    head.{weight,bias}                Conv2d(D, C, 3, pad 1): the coarse CAM head

Fusion keys (`adaptive_attention_fusion.` prefix), K = depth * heads maps stacked head-major
(map index head * depth + layer; ours is layer-major, so the head FFN is permuted):

- "v1" (paper, first release): `fc.0.weight` (K/r, K), `fc.2.weight` (K, K/r) -> fusion "aaf".
  Recipe: avg pooling, r = 4.
- "v2" (plain AAF of the later code): `attn_head_ffn.0.weight`, `attn_head_ffn.2.weight`,
  same maths as v1 -> fusion "aaf".
- "v3" (current code, released 69.4 checkpoint): `attn_head_ffn.{0,2}.weight` plus
  `attn_feat_ffn.0.{weight,bias}` (D/H/fr, D/H) and `attn_feat_ffn.1.{weight,bias}` (1, D/H/fr)
  -> fusion "aaf-feat". Recipe: max pooling, r = 8, fr = 8.

The pooling type is not stored in a checkpoint; it defaults to the layout's recipe. (An
intermediate "AttnFeat" variant pooled block outputs instead of attention outputs with the same
keys as v3; such checkpoints load but compute v3's fusion.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from weaktr_cli.errors import WeakTrError
from weaktr_cli.models.cam_vit import WeakTrCAM
from weaktr_cli.models.registry import ARCHS, ArchSpec
from weaktr_cli.models.weights import describe_key_mismatch, read_state_dict, strict_load

__all__ = [
    "ReferenceConfig",
    "convert_reference_state_dict",
    "head_major_to_layer_major",
    "load_reference_checkpoint",
]

_AAF = "adaptive_attention_fusion."
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")
_BLOCK_PARAMS = {
    f"{module}.{kind}"
    for module in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    for kind in ("weight", "bias")
}
#: layout -> (head FFN key stem, fusion, recipe pooling)
_LAYOUTS = {
    "v1": ("fc", "aaf", "avg"),
    "v2": ("attn_head_ffn", "aaf", "avg"),
    "v3": ("attn_head_ffn", "aaf-feat", "max"),
}


@dataclass(frozen=True)
class ReferenceConfig:
    """What a reference checkpoint implies for `WeakTrCAM` (read from tensor shapes)."""

    layout: str  #: "v1", "v2" or "v3" (module docstring)
    arch: ArchSpec
    num_classes: int
    fusion: str
    aaf_reduction: int
    aaf_feat_reduction: int
    pool: str  #: the layout's training-recipe pooling (not stored in the file)

    def model_kwargs(self, aaf_pool: str | None = None) -> dict[str, Any]:
        """Keyword arguments for `WeakTrCAM(**kwargs)`."""
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "fusion": self.fusion,
            "aaf_pool": aaf_pool or self.pool,
            "aaf_reduction": self.aaf_reduction,
            "aaf_feat_reduction": self.aaf_feat_reduction,
        }


def head_major_to_layer_major(depth: int, num_heads: int) -> Tensor:
    """Index tensor `perm` with ours[k] = reference[perm[k]] for k = layer * heads + head."""
    layer = torch.arange(depth).repeat_interleave(num_heads)
    head = torch.arange(num_heads).repeat(depth)
    return head * depth + layer


def _require(state: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise WeakTrError(
            f"not a WeakTr CAM checkpoint: key {key!r} is missing",
            hint="an ImageNet backbone checkpoint loads with load_pretrained_backbone instead",
        )
    return state[key]


def _exact_reduction(total: int, hidden: int, what: str) -> int:
    r = total // hidden if hidden else 0
    if r < 1 or total // r != hidden:
        raise WeakTrError(
            f"{what}: a hidden size of {hidden} for {total} inputs is no integer reduction"
        )
    return r


def _arch_from_shapes(
    state: Mapping[str, Tensor], num_classes: int, depth: int, heads: int
) -> ArchSpec:
    proj = _require(state, "patch_embed.proj.weight")  # (D, 3, p, p)
    dim, patch = proj.shape[0], proj.shape[-1]
    num_patches = _require(state, "pos_embed").shape[1] - num_classes
    g = math.isqrt(max(num_patches, 0))
    if g * g != num_patches or g == 0:
        raise WeakTrError(
            f"reference pos_embed holds {num_patches} patch positions: not a square grid"
        )
    mlp_ratio = _require(state, "blocks.0.mlp.fc1.weight").shape[0] / dim
    if dim % heads:
        raise WeakTrError(f"embedding width {dim} does not split into {heads} heads")
    dims = (patch, dim, depth, heads, g * patch, mlp_ratio)
    for spec in ARCHS.values():
        if (
            spec.patch_size,
            spec.embed_dim,
            spec.depth,
            spec.num_heads,
            spec.img_size,
            spec.mlp_ratio,
        ) == dims:
            return spec
    return ArchSpec(
        "reference-custom",
        patch,
        dim,
        depth,
        heads,
        g * patch,
        mlp_ratio,
        description="shapes read from a reference checkpoint",
    )


def convert_reference_state_dict(
    state: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], str, ReferenceConfig]:
    """Map a reference `WeakTr` state dict onto `WeakTrCAM` keys.

    Returns (state dict for `WeakTrCAM`, fusion name, `ReferenceConfig`). Raises `WeakTrError`
    for keys of no known layout (named, with counts) and for inconsistent shapes; missing keys
    surface when the result is loaded (`load_reference_checkpoint` does it strictly).
    """
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    num_classes = _class_count(state)
    layout = _layout(state)
    stem, fusion, pool = _LAYOUTS[layout]

    depth = len({m.group(1) for k in state if (m := _BLOCK_KEY.fullmatch(k))})
    w1 = _require(state, f"{_AAF}{stem}.0.weight")  # (K/r, K)
    w2 = _require(state, f"{_AAF}{stem}.2.weight")  # (K, K/r)
    num_maps, hidden = w1.shape[1], w1.shape[0]
    if depth == 0 or num_maps % depth:
        raise WeakTrError(
            f"fusion expects {num_maps} attention maps, not a multiple of {depth} blocks"
        )
    heads = num_maps // depth
    arch = _arch_from_shapes(state, num_classes, depth, heads)
    reduction = _exact_reduction(num_maps, hidden, "reference head FFN")
    feat_reduction = _feat_reduction(state, arch) if layout == "v3" else 8

    out = _renamed(state, layout, stem, head_major_to_layer_major(depth, heads))
    if w2.shape != (num_maps, hidden):
        raise WeakTrError(
            f"reference head FFN shapes disagree: {list(w1.shape)} and {list(w2.shape)}"
        )
    config = ReferenceConfig(layout, arch, num_classes, fusion, reduction, feat_reduction, pool)
    return out, fusion, config


def _class_count(state: Mapping[str, Tensor]) -> int:
    """The class count of a reference CAM state dict (its cls tokens), checking its conv head."""
    cls_token = _require(state, "cls_token")
    head = _require(state, "head.weight")
    if head.ndim != 4:
        raise WeakTrError(
            "not a WeakTr CAM checkpoint: 'head.weight' is not a conv kernel "
            f"(shape {list(head.shape)})",
            hint="an ImageNet backbone checkpoint loads with load_pretrained_backbone instead",
        )
    return int(cls_token.shape[1])


def _layout(state: Mapping[str, Tensor]) -> str:
    """Which of the reference's fusion layouts (v1, v2, v3) the state dict holds."""
    if _AAF + "fc.0.weight" in state:
        return "v1"
    if _AAF + "attn_feat_ffn.0.weight" in state:
        return "v3"
    if _AAF + "attn_head_ffn.0.weight" in state:
        return "v2"
    raise WeakTrError(
        "not a WeakTr CAM checkpoint: no adaptive_attention_fusion weights",
        hint=f"its keys start with: {', '.join(sorted(state)[:5])}",
    )


def _feat_reduction(state: Mapping[str, Tensor], arch: ArchSpec) -> int:
    """The v3 layout's feature-FFN reduction, checked against the heads' width."""
    f1 = _require(state, _AAF + "attn_feat_ffn.0.weight")  # (hd/fr, hd)
    if f1.shape[1] != arch.head_dim:
        raise WeakTrError(
            f"reference feature FFN takes {f1.shape[1]} inputs, heads are {arch.head_dim} wide"
        )
    return _exact_reduction(arch.head_dim, f1.shape[0], "reference feature FFN")


def _renamed(
    state: Mapping[str, Tensor], layout: str, stem: str, perm: Tensor
) -> dict[str, Tensor]:
    """The state dict under `WeakTrCAM` keys, the head FFN's maps reordered layer-major by
    `perm`; a key of no known layout is an error."""
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        block = _BLOCK_KEY.fullmatch(key)
        if key in ("cls_token", "pos_embed", "head.weight", "head.bias"):
            out[key] = value
        elif key.startswith("patch_embed.proj.") or (block and block.group(2) in _BLOCK_PARAMS):
            out["backbone." + key] = value
        elif key in ("norm.weight", "norm.bias"):
            continue  # the reference defines a final norm but never applies it
        elif key == f"{_AAF}{stem}.0.weight":
            out["fusion.head_ffn.0.weight"] = value[:, perm]
        elif key == f"{_AAF}{stem}.2.weight":
            out["fusion.head_ffn.2.weight"] = value[perm, :]
        elif layout == "v3" and key.startswith(_AAF + "attn_feat_ffn."):
            out["fusion.feat_ffn." + key[len(_AAF + "attn_feat_ffn.") :]] = value
        else:
            unknown.append(key)
    if unknown:
        raise WeakTrError(
            f"reference checkpoint ({layout} layout) has keys of no known layout: "
            + describe_key_mismatch([], unknown)
        )
    return out


def load_reference_checkpoint(
    path: str | Path,
    *,
    aaf_pool: str | None = None,
    num_classes: int | None = None,
    detach_fine: bool = True,
) -> WeakTrCAM:
    """A `WeakTrCAM` holding an official WeakTr CAM checkpoint (strictly checked), in eval mode.

    aaf_pool: fusion pooling; default the layout's recipe ("max" for v3, "avg" for v1/v2).
    num_classes: when given, must equal the checkpoint's class count.
    """
    path = Path(path)
    converted, _, config = convert_reference_state_dict(read_state_dict(path))
    if num_classes is not None and num_classes != config.num_classes:
        raise WeakTrError(
            f"checkpoint {path} has {config.num_classes} classes, the dataset has {num_classes}",
            hint="pick the checkpoint trained on this dataset",
        )
    model = WeakTrCAM(**config.model_kwargs(aaf_pool), detach_fine=detach_fine)
    strict_load(model, converted, what=f"reference checkpoint {path} ({config.layout} layout)")
    return model.eval()
