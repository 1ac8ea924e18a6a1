"""The online-retraining segmentation model: a timm ViT encoder and a Segmenter decoder.

Architecture (docs/method.md, phase 4; Strudel et al., "Segmenter", 2021):

- Encoder: a timm `VisionTransformer` with one class token, the final LayerNorm applied and
  `dynamic_img_size=True` (the positional embedding, stored for the training crop, is resampled
  by timm for other grids). The input is zero-padded bottom/right to a multiple of the patch
  size; the output is cropped back.
- Decoder (`MaskTransformerDecoder`): patch tokens -> `proj_dec` -> concatenated with `n_cls`
  learned class embeddings -> `n_layers` transformer blocks -> `decoder_norm`; patch and class
  outputs are projected (`proj_patch`, `proj_classes`), L2-normalised, multiplied
  (masks = patches @ classes^T), normalised over classes (`mask_norm`), reshaped to the patch
  grid and upsampled bilinearly to the input size.
- Or `LinearDecoder` (`decoder="linear"`), Segmenter's linear baseline: one linear layer from
  each patch token to the class logits. It trains faster from scratch: on the built-in data,
  trained on the ground truth (38k crops, no scale augmentation), the `tiny-c8` hybrid told
  circles from squares with it (80.7 val mIoU) and not with the mask transformer (44.7 after
  31k crops). See docs/experiments.md for what happens on seeds.

Parameter names follow the reference implementation (`encoder.*` as timm, `decoder.cls_emb`,
`decoder.proj_dec`, `decoder.proj_patch`, ...), so a reference retraining checkpoint maps
one-to-one onto this module (its encoder classification `head` aside).

The forward pass is written for `torch.export` with dynamic batch, H and W: sizes come from
tensor shapes, and nothing branches on tensor values. Export with an example batch of at least
2 (a size-1 dim is specialised) and H, W above one patch; the graph then accepts any
H, W > patch size (a 1-patch grid is excluded by timm's reshapes).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from timm.layers import Attention, LayerNorm, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from weaktr_cli.errors import WeakTrError
from weaktr_cli.models.decoders import (
    DECODERS,
    LinearDecoder,
    MaskTransformerDecoder,
    check_decoder,
)
from weaktr_cli.models.registry import ArchSpec, build_vit, get_arch

__all__ = [
    "DECODERS",
    "POS_EMBED_INTERPOLATIONS",
    "BilinearPosEmbedViT",
    "LinearDecoder",
    "MaskTransformerDecoder",
    "Segmenter",
    "build_segmenter",
    "check_decoder",
    "encoder_norm_eps",
    "encoder_pos_embed_interp",
    "param_groups",
    "use_explicit_attention",
]


#: How the encoder's positional embedding is resampled for grids other than the training
#: crop's: timm's "bicubic" (antialiased), or "bilinear" as the reference's Segmenter ViT.
POS_EMBED_INTERPOLATIONS = ("bicubic", "bilinear")


class BilinearPosEmbedViT(VisionTransformer):
    """timm ViT whose positional embedding is resampled bilinearly (half-pixel centres, no
    antialiasing) for other grids, as the reference's Segmenter ViT does (hustvl/WeakTr 0ff9d9a
    OnlineRetraining/segm/model/utils.py:37, segm/model/vit.py:125-131). Same parameters and
    state-dict keys as timm's class; only the resampling differs."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.dynamic_img_size or self.pos_embed is None or self.no_embed_class
                or self.reg_token is not None or self.cls_token is None):
            return super()._pos_embed(x)
        batch, grid_h, grid_w, dim = x.shape
        pos_embed = resample_abs_pos_embed(
            self.pos_embed,
            new_size=(grid_h, grid_w),
            old_size=self.patch_embed.grid_size,
            num_prefix_tokens=self.num_prefix_tokens,
            interpolation="bilinear",
            antialias=False,
        )
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, dim)), 1)
        out: torch.Tensor = self.pos_drop(tokens + pos_embed)
        return out


def _encoder_for(spec: ArchSpec, img_size: int, drop_path_rate: float, norm_eps: float = 1e-6,
                 pos_embed_interp: str = "bicubic") -> VisionTransformer:
    """A timm ViT for the retraining encoder, randomly initialised (load weights separately).

    One class token, final LayerNorm applied (unless `spec.final_norm` is off), no
    classification head, positional embedding for an `img_size` x `img_size` crop, resampled
    for other grids (`dynamic_img_size=True`).
    The reference's Segmenter uses LayerNorm eps 1e-5 and bilinear resampling (`norm_eps=1e-5`,
    `pos_embed_interp="bilinear"`) where timm uses 1e-6 and bicubic.
    """
    if pos_embed_interp not in POS_EMBED_INTERPOLATIONS:
        raise WeakTrError(f"unknown position-embedding interpolation {pos_embed_interp!r}",
                          hint=f"use {' or '.join(POS_EMBED_INTERPOLATIONS)}")
    # timm's own norm layer unless another epsilon is asked for, so default encoders stay
    # exactly what they were.
    norm: dict[str, Any] = {} if norm_eps == 1e-6 else {"norm_layer": partial(LayerNorm,
                                                                                 eps=norm_eps)}
    # global_pool="" keeps every token and the final norm; class_token is explicit because the
    # decoder drops exactly the prefix tokens.
    return build_vit(
        spec,
        vit_class=BilinearPosEmbedViT if pos_embed_interp == "bilinear" else VisionTransformer,
        img_size=img_size,
        global_pool="",
        class_token=True,
        final_norm=spec.final_norm,
        dynamic_img_size=True,
        drop_path_rate=drop_path_rate,
        **norm,
    )


def encoder_norm_eps(encoder: VisionTransformer) -> float:
    """The LayerNorm epsilon of `encoder` (its final norm's; every block uses the same)."""
    return float(getattr(encoder.norm, "eps", 1e-6))


def encoder_pos_embed_interp(encoder: VisionTransformer) -> str:
    """"bilinear" for a `BilinearPosEmbedViT`, else timm's "bicubic"."""
    return "bilinear" if isinstance(encoder, BilinearPosEmbedViT) else "bicubic"


class Segmenter(nn.Module):
    """ViT encoder + Segmenter decoder; `forward(images)` -> per-pixel class logits.

    Args:
        encoder: a timm `VisionTransformer` with a class token, the final norm applied (when
            it has blocks) and `dynamic_img_size=True` (see `build_segmenter`).
        n_cls: output classes including background (VOC 21, COCO 91 ids).
        decoder_layers, decoder_heads, decoder_dim, decoder_mlp_ratio, decoder_dropout,
            decoder_drop_path: see `MaskTransformerDecoder`; `decoder_heads` defaults to the
            encoder's head count (the reference uses width // 64, the same for ViT-S/B/L) and
            `decoder_dim` to the encoder width.
        decoder: "mask" (the mask transformer, the paper's) or "linear" (`LinearDecoder`;
            the mask transformer's settings are then unused).
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        n_cls: int,
        *,
        decoder_layers: int = 2,
        decoder_heads: int | None = None,
        decoder_dim: int | None = None,
        decoder_mlp_ratio: float = 4.0,
        decoder_dropout: float = 0.1,
        decoder_drop_path: float = 0.0,
        decoder: str = "mask",
    ) -> None:
        super().__init__()
        _check_encoder(encoder)
        check_decoder(decoder)
        if n_cls < 2:
            raise WeakTrError(f"a segmenter needs at least 2 classes (background + 1), got {n_cls}")
        patch = encoder.patch_embed.patch_size
        self.patch_size: tuple[int, int] = (int(patch[0]), int(patch[1]))
        self.n_cls = n_cls
        self.num_prefix_tokens = int(encoder.num_prefix_tokens)
        self.encoder = encoder
        self._build_config: dict[str, Any] | None = None  # set by build_segmenter
        self.decoder: MaskTransformerDecoder | LinearDecoder
        if decoder == "linear":
            self.decoder = LinearDecoder(n_cls, int(encoder.embed_dim))
            return
        heads = decoder_heads if decoder_heads is not None else _encoder_heads(encoder)
        self.decoder = MaskTransformerDecoder(
            n_cls,
            int(encoder.embed_dim),
            n_layers=decoder_layers,
            n_heads=heads,
            d_model=decoder_dim,
            mlp_ratio=decoder_mlp_ratio,
            dropout=decoder_dropout,
            drop_path_rate=decoder_drop_path,
        )

    def config(self) -> dict[str, Any]:
        """JSON-able build arguments; `Segmenter.from_config(model.config())` rebuilds it.

        Only for models made by `build_segmenter` (which records them).
        """
        if self._build_config is None:
            raise WeakTrError("this Segmenter was not made by build_segmenter: no config")
        return dict(self._build_config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Segmenter:
        """Rebuild a (randomly initialised) model from `config()`; load weights afterwards.

        The backbone comes spelled out (`encoder`), so a checkpoint does not depend on the
        registry staying the same; 0.1.0 checkpoints have no `decoder` (then "mask").
        """
        cfg = dict(config)
        spec = ArchSpec(**cfg.pop("encoder"))
        return build_segmenter(
            int(cfg.pop("n_cls")), spec, img_size=int(cfg.pop("img_size")),
            drop_path_rate=float(cfg.pop("drop_path_rate")),
            decoder=str(cfg.pop("decoder", "mask")),
            decoder_layers=int(cfg.pop("decoder_layers")),
            decoder_dropout=float(cfg.pop("decoder_dropout")), **cfg)

    @property
    def decoder_kind(self) -> str:
        """"linear" or "mask" (see `DECODERS`)."""
        return "linear" if isinstance(self.decoder, LinearDecoder) else "mask"

    @property
    def num_decoder_layers(self) -> int:
        """How many per-layer mask maps `forward(x, return_layers=True)` returns."""
        return self.decoder.n_layers

    def forward_layers(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Logits after every decoder layer, each upsampled to the input size.

        Args:
            images: (B, 3, H, W) float, normalised as the encoder's pretraining expects.

        Returns:
            `num_decoder_layers` tensors (B, n_cls, H, W) float; the last equals `forward`.
        """
        height, width = images.shape[-2], images.shape[-1]
        ph, pw = self.patch_size
        # Grid by ceiling division (not `H + (-H % p)`), so a symbolic tracer can prove that
        # the padded size is a multiple of the patch size.
        grid_h = (height + ph - 1) // ph
        grid_w = (width + pw - 1) // pw
        padded_h, padded_w = grid_h * ph, grid_w * pw
        # Pad bottom/right only, so cropping the first H rows, W columns recovers the input grid.
        x = F.pad(images, (0, padded_w - width, 0, padded_h - height))
        tokens = self.encoder.forward_features(x)[:, self.num_prefix_tokens :]
        layers = self.decoder(tokens, grid_h, grid_w)
        # Eager inputs whose sides are multiples of the patch size (every training crop) skip
        # the crop: its index_select and backward cost ~15 % of a stem-only training step.
        # An exported graph always crops, or it would be specialised to padded inputs.
        crop = _is_traced() or (padded_h, padded_w) != (height, width)
        out = []
        for masks in layers:
            up = F.interpolate(
                masks, size=(padded_h, padded_w), mode="bilinear", align_corners=False
            )
            if crop:
                # index_select, not [:H] or narrow: those make torch.export guard on whether
                # the crop is a no-op, which specialises the graph to padded inputs.
                rows = torch.arange(height, device=up.device)
                cols = torch.arange(width, device=up.device)
                up = up.index_select(2, rows).index_select(3, cols)
            out.append(up)
        return tuple(out)

    @overload
    def forward(
        self, images: torch.Tensor, return_layers: Literal[False] = ...
    ) -> torch.Tensor: ...

    @overload
    def forward(
        self, images: torch.Tensor, return_layers: Literal[True]
    ) -> tuple[torch.Tensor, ...]: ...

    def forward(
        self, images: torch.Tensor, return_layers: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Per-pixel class logits.

        Args:
            images: (B, 3, H, W) float, any H, W (padded internally to the patch size).
            return_layers: return the tuple of per-decoder-layer logits instead (see
                `forward_layers`); the flag is a Python constant, never traced.

        Returns:
            (B, n_cls, H, W) float logits, or a tuple of them when `return_layers`.
        """
        layers = self.forward_layers(images)
        return layers if return_layers else layers[-1]


def _is_traced() -> bool:
    """Whether the forward is being captured into a graph (torch.export / compile / jit)."""
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing()
                or torch.jit.is_scripting())


def build_segmenter(
    n_cls: int,
    arch: str | ArchSpec = "vit-small",
    *,
    img_size: int = 480,
    drop_path_rate: float = 0.1,
    norm_eps: float = 1e-6,
    pos_embed_interp: str = "bicubic",
    **decoder_kwargs: Any,
) -> Segmenter:
    """A randomly initialised `Segmenter` whose encoder is the registered backbone `arch`.

    Args:
        n_cls: output classes including background.
        arch: a registry name (`weaktr_cli.models.registry`) or an `ArchSpec`; unknown names
            raise `WeakTrError` listing the valid ones.
        img_size: training crop the positional embedding is stored for (reference: 480,
            whatever the backbone was pretrained at; loading pretrained weights resamples).
        drop_path_rate: encoder stochastic depth (reference: 0.1).
        norm_eps, pos_embed_interp: encoder LayerNorm epsilon and positional-embedding
            resampling (timm's: 1e-6, "bicubic"; the reference's: 1e-5, "bilinear").
        decoder_kwargs: `Segmenter`'s keyword arguments (`decoder_layers`, `decoder_heads`,
            `decoder_dim`, `decoder_mlp_ratio`, `decoder_dropout`, `decoder_drop_path`).
    """
    spec = get_arch(arch) if isinstance(arch, str) else arch
    encoder = _encoder_for(spec, img_size, drop_path_rate, norm_eps, pos_embed_interp)
    model = Segmenter(encoder, n_cls, **decoder_kwargs)
    extra = dict(decoder_kwargs)
    # The reference-checkpoint options are recorded only when set, so weaktr's own
    # checkpoints keep their metadata.
    if norm_eps != 1e-6:
        extra["norm_eps"] = norm_eps
    if pos_embed_interp != "bicubic":
        extra["pos_embed_interp"] = pos_embed_interp
    model._build_config = {
        "encoder": dataclasses.asdict(spec),
        "n_cls": n_cls,
        "img_size": img_size,
        "drop_path_rate": drop_path_rate,
        "decoder": extra.pop("decoder", "mask"),
        "decoder_layers": extra.pop("decoder_layers", 2),
        "decoder_dropout": extra.pop("decoder_dropout", 0.1),
        **extra,
    }
    return model


def use_explicit_attention(model: nn.Module) -> None:
    """Switch timm's attention layers from the fused kernel to softmax(q k^T) v.

    On CPU under bf16 autocast the fused kernel's backward is the slow part of a step: per
    training step on 2 threads, tiny-c8 batch 16 at 96 px 108 -> 81 ms, DeiT-S batch 2 at 480 px
    2.59 -> 2.28 s. Same weights and outputs, so checkpoints and exports are unaffected.
    """
    for module in model.modules():
        if isinstance(module, Attention):
            setattr(module, "fused_attn", False)  # noqa: B010 (declared Final, read per call)


def param_groups(model: Segmenter, lr: float, encoder_lr_mult: float = 0.1) -> list[dict[str, Any]]:
    """Optimiser parameter groups: the encoder at `lr * encoder_lr_mult`, the decoder at `lr`.

    Each group carries `name` ("encoder" / "decoder") and `lr_mult`, so a scheduler can set
    `group["lr"] = base_lr(t) * group["lr_mult"]`. Frozen parameters and empty groups are left
    out. No weight-decay split: the reference retrains with weight decay 0.
    """
    groups = []
    for name, module, mult in (
        ("encoder", model.encoder, encoder_lr_mult),
        ("decoder", model.decoder, 1.0),
    ):
        params = [p for p in module.parameters() if p.requires_grad]
        if params:
            groups.append({"name": name, "params": params, "lr": lr * mult, "lr_mult": mult})
    return groups


def _check_encoder(encoder: nn.Module) -> None:
    if not isinstance(encoder, VisionTransformer):
        raise WeakTrError(
            f"the segmenter encoder must be a timm VisionTransformer, got {type(encoder).__name__}"
        )
    if encoder.cls_token is None:
        raise WeakTrError(
            "the segmenter encoder has no class token",
            hint="build it with class_token=True (see build_segmenter)",
        )
    if not encoder.dynamic_img_size:
        raise WeakTrError(
            "the segmenter encoder cannot take other input sizes than its training crop",
            hint="build it with dynamic_img_size=True (see build_segmenter)",
        )
    # Pre-norm blocks leave the residual stream un-normalised, so a transformer's tokens need
    # the final norm; a stem-only encoder (no blocks) may go without (`ArchSpec.final_norm`).
    if isinstance(encoder.norm, nn.Identity) and len(encoder.blocks) > 0:
        raise WeakTrError(
            "the segmenter encoder does not apply its final norm to the tokens",
            hint="build it with global_pool='' and final_norm=True (see build_segmenter)",
        )


def _encoder_heads(encoder: VisionTransformer) -> int:
    for module in encoder.modules():
        if isinstance(module, Attention):
            return int(module.num_heads)
    # A custom attention layer: the reference's rule, width // 64 (ViT-S: 6).
    return max(1, int(encoder.embed_dim) // 64)
