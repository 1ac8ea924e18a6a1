"""Named ViT backbones: `--arch deit-small` -> timm `VisionTransformer` hyper-parameters.

Every backbone is built from timm's own `VisionTransformer` class (no vendored ViT) and never
downloads anything: pretrained weights come only from local files via
`weaktr_cli.models.weights.load_pretrained_backbone`. Where an architecture has a timm
counterpart (`timm_name`), its kwargs reproduce that model's parameter shapes exactly, so its
checkpoints load without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from timm.models.vision_transformer import VisionTransformer

from weaktr_cli.errors import WeakTrError
from weaktr_cli.models.stem import ConvStemPatchEmbed, stem_stride

__all__ = ["ARCHS", "ArchSpec", "arch_names", "build_vit", "get_arch", "register_arch"]


@dataclass(frozen=True)
class ArchSpec:
    """A plain ViT: patch size, width, depth, heads and the input size its pos-embed is for.

    All backbones use qkv bias and LayerNorm eps 1e-6 (timm's `LayerNorm` default, as DeiT).
    """

    name: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    img_size: int
    mlp_ratio: float = 4.0
    #: timm model name with the same parameter layout (for pretrained checkpoints), if any
    timm_name: str | None = None
    description: str = ""
    #: conv stem layers (channels, stride, dilation) replacing the linear patch embedding
    #: (`weaktr_cli.models.stem`); empty = a plain ViT. The strides multiply to `patch_size`.
    stem: tuple[tuple[int, int, int], ...] = ()
    #: LayerNorm on the encoder's output tokens (timm's default); the stem-only segmenter goes
    #: without: per-token normalisation delayed its learning of the shapes (docs/experiments.md)
    final_norm: bool = True

    def __post_init__(self) -> None:
        if self.stem and stem_stride(self.stem) != self.patch_size:
            raise ValueError(f"{self.name}: stem stride != patch size {self.patch_size}")

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, cols) of the stored positional embedding."""
        g = self.img_size // self.patch_size
        return (g, g)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_attention_maps(self) -> int:
        """Layers x heads: the number of attention maps the CAM model fuses (DeiT-S: 72)."""
        return self.depth * self.num_heads

    def vit_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `timm.models.vision_transformer.VisionTransformer`."""
        kwargs: dict[str, Any] = {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": True,
        }
        if not self.final_norm:
            kwargs["final_norm"] = False
        if self.stem:
            kwargs["embed_layer"] = partial(ConvStemPatchEmbed, stem=self.stem)
        return kwargs


#: tiny-c8's stem at half the width (16-64 channels), shared by the two lighter segmenters.
_HALF_WIDTH_STEM = ((16, 2, 1), (32, 2, 1), (64, 2, 1), (64, 1, 2), (64, 1, 4), (64, 1, 8))

ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec(
            name="deit-small",
            patch_size=16,
            embed_dim=384,
            depth=12,
            num_heads=6,
            img_size=224,
            timm_name="deit_small_patch16_224",
            description="DeiT-S/16 at 224 px, the paper's CAM backbone",
        ),
        ArchSpec(
            name="vit-small",
            patch_size=16,
            embed_dim=384,
            depth=12,
            num_heads=6,
            img_size=384,
            timm_name="vit_small_patch16_384",
            description="ViT-S/16 (ImageNet-21k) at 384 px, the paper's strongest encoder",
        ),
        ArchSpec(
            name="deit-tiny",
            patch_size=16,
            embed_dim=192,
            depth=12,
            num_heads=3,
            img_size=224,
            timm_name="deit_tiny_patch16_224",
            description="DeiT-Ti/16 at 224 px",
        ),
        ArchSpec(
            name="tiny-p8",
            patch_size=8,
            embed_dim=128,
            depth=4,
            num_heads=4,
            img_size=96,
            description="CPU-sized: patch 8, dim 128, depth 4 at 96 px (built-in dataset)",
        ),
        ArchSpec(
            name="tiny-c8",
            patch_size=8,
            embed_dim=128,
            depth=2,
            num_heads=4,
            img_size=96,
            # stride 2, 2, 2, then dilations 2, 4, 8: a receptive field as wide as the image
            stem=((32, 2, 1), (64, 2, 1), (128, 2, 1), (128, 1, 2), (128, 1, 4), (128, 1, 8)),
            description="CPU-sized hybrid: conv stem (stride 8) + ViT dim 128, depth 2 at 96 px "
            "(built-in dataset's segmenter)",
        ),
        ArchSpec(
            name="tiny-c8s",
            patch_size=8,
            embed_dim=128,
            depth=1,
            num_heads=4,
            img_size=96,
            # tiny-c8 at half the stem width and one block: 2x the crops per CPU-second
            stem=_HALF_WIDTH_STEM,
            description="CPU-sized hybrid, lighter: conv stem of 16-64 channels (stride 8) + "
            "ViT dim 128, depth 1 at 96 px",
        ),
        ArchSpec(
            name="tiny-c8-stem",
            patch_size=8,
            embed_dim=64,
            # No transformer block: on the built-in dataset even one block delays the step at
            # which a from-scratch encoder learns circle vs square beyond a CPU budget
            # (docs/experiments.md, issue 16), so its segmenter is the stem alone.
            depth=0,
            num_heads=1,
            img_size=96,
            stem=_HALF_WIDTH_STEM,
            final_norm=False,
            description="CPU-sized conv stem alone: 16-64 channels (stride 8), width 64, no "
            "ViT blocks, at 96 px (built-in dataset's segmenter)",
        ),
    )
}


def arch_names() -> list[str]:
    """Registered architecture names, in registry order."""
    return list(ARCHS)


#: The backbones weaktr ships (the shell completions list these; see `register_arch`).
SHIPPED_ARCHS: tuple[str, ...] = tuple(ARCHS)


def register_arch(spec: ArchSpec) -> None:
    """Add (or replace) a backbone under `spec.name`, e.g. a project's own or a test's."""
    ARCHS[spec.name] = spec


def get_arch(name: str) -> ArchSpec:
    """The `ArchSpec` registered as `name`; an unknown name raises `WeakTrError` listing all."""
    try:
        return ARCHS[name]
    except KeyError:
        raise WeakTrError(
            f"unknown architecture {name!r}",
            hint=f"choose one of: {', '.join(ARCHS)}",
        ) from None


def build_vit(spec: ArchSpec, *, vit_class: type[VisionTransformer] = VisionTransformer,
              **overrides: Any) -> VisionTransformer:
    """A randomly initialised timm `VisionTransformer` for `spec` (never downloads weights).

    Defaults: one class token, no classification head (`num_classes=0`), final norm on,
    `dynamic_img_size=True` (patch tokens come out as (B, h, w, D) and timm resamples the
    pos-embed per input). `overrides` replace or extend these kwargs (e.g. `class_token=False`,
    `drop_path_rate=0.1`, `attn_layer=...`); `vit_class` may be a subclass of timm's.
    """
    kwargs: dict[str, Any] = {"num_classes": 0, "dynamic_img_size": True, **spec.vit_kwargs()}
    kwargs.update(overrides)
    return vit_class(**kwargs)
