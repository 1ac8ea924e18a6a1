"""The two decoders of the retraining `Segmenter` (docs/method.md, phase 4).

- `MaskTransformerDecoder`: patch tokens -> `proj_dec` -> concatenated with `n_cls` learned
  class embeddings -> `n_layers` transformer blocks -> `decoder_norm`; patch and class outputs
  projected, L2-normalised and multiplied (masks = patches @ classes^T), normalised over
  classes (`mask_norm`) and reshaped to the patch grid, after every layer.
- `LinearDecoder`: one linear layer from each patch token to the class logits.

Parameter names follow the reference implementation (`cls_emb`, `proj_dec`, `proj_patch`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from weaktr_cli.errors import WeakTrError

__all__ = ["DECODERS", "LinearDecoder", "MaskTransformerDecoder", "check_decoder"]


def _init_decoder_weights(module: nn.Module) -> None:
    # Segmenter's init: truncated normal linear weights, zero biases, identity LayerNorms.
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MaskTransformerDecoder(nn.Module):
    """Segmenter's mask transformer: class embeddings attend jointly with patch tokens.

    Args:
        n_cls: number of output classes, background included.
        d_encoder: channel width of the encoder's patch tokens.
        n_layers: transformer blocks (reference: 2).
        n_heads: attention heads per block.
        d_model: decoder width (reference: the encoder width).
        mlp_ratio: feed-forward width / d_model (reference: 4).
        dropout: dropout on attention weights, projections and MLP (reference: 0.1).
        drop_path_rate: stochastic depth, linearly increasing over blocks (reference: 0).
    """

    def __init__(
        self,
        n_cls: int,
        d_encoder: int,
        *,
        n_layers: int = 2,
        n_heads: int = 6,
        d_model: int | None = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        d_model = d_encoder if d_model is None else d_model
        if n_layers < 1:
            raise WeakTrError(f"the decoder needs at least one layer, got {n_layers}")
        if d_model % n_heads != 0:
            raise WeakTrError(
                f"decoder width {d_model} is not divisible by {n_heads} heads",
                hint="pick a head count that divides the decoder width",
            )
        self.n_cls = n_cls
        self.n_layers = n_layers
        self.d_model = d_model
        drop_path = torch.linspace(0, drop_path_rate, n_layers).tolist()
        self.blocks = nn.ModuleList(
            [
                Block(
                    d_model,
                    n_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=True,
                    proj_drop=dropout,
                    attn_drop=dropout,
                    drop_path=drop_path[i],
                    norm_layer=nn.LayerNorm,
                )
                for i in range(n_layers)
            ]
        )
        self.cls_emb = nn.Parameter(torch.zeros(1, n_cls, d_model))
        self.proj_dec = nn.Linear(d_encoder, d_model)
        scale = d_model**-0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.mask_norm = nn.LayerNorm(n_cls)
        self.apply(_init_decoder_weights)
        trunc_normal_(self.cls_emb, std=0.02)

    def _masks(self, tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """(B, P + n_cls, d_model) decoder tokens -> (B, n_cls, grid_h, grid_w) mask logits."""
        x = self.decoder_norm(tokens)
        patches = x[:, : -self.n_cls] @ self.proj_patch
        classes = x[:, -self.n_cls :] @ self.proj_classes
        patches = F.normalize(patches, dim=-1)
        classes = F.normalize(classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, P, n_cls)
        return masks.transpose(1, 2).reshape(masks.shape[0], self.n_cls, grid_h, grid_w)

    def forward(self, patch_tokens: torch.Tensor, grid_h: int, grid_w: int) -> list[torch.Tensor]:
        """Mask logits after every decoder block.

        Args:
            patch_tokens: (B, grid_h * grid_w, d_encoder) float, row-major over the grid.
            grid_h, grid_w: the patch grid (ints or symbolic sizes from a tensor shape).

        Returns:
            `n_layers` tensors (B, n_cls, grid_h, grid_w); the last is the model's output, the
            earlier ones are what the reference fuses at inference (0.8 * P1 + P2).
        """
        x = self.proj_dec(patch_tokens)
        x = torch.cat((x, self.cls_emb.expand(x.shape[0], -1, -1)), dim=1)
        layers = []
        for block in self.blocks:
            x = block(x)
            layers.append(self._masks(x, grid_h, grid_w))
        return layers


class LinearDecoder(nn.Module):
    """Segmenter's linear decoder: patch token -> class logits, one linear layer (`head`, the
    reference's name). Returns a one-element list, like `MaskTransformerDecoder` with 1 layer."""

    n_layers = 1

    def __init__(self, n_cls: int, d_encoder: int) -> None:
        super().__init__()
        self.n_cls = n_cls
        self.head = nn.Linear(d_encoder, n_cls)
        self.apply(_init_decoder_weights)

    def forward(self, patch_tokens: torch.Tensor, grid_h: int, grid_w: int) -> list[torch.Tensor]:
        """(B, grid_h * grid_w, d_encoder) -> [(B, n_cls, grid_h, grid_w)]."""
        masks = self.head(patch_tokens)
        return [masks.transpose(1, 2).reshape(masks.shape[0], self.n_cls, grid_h, grid_w)]


#: Decoder kinds `Segmenter(decoder=...)` accepts.
DECODERS = ("mask", "linear")


def check_decoder(name: str) -> None:
    """Raise `WeakTrError` unless `name` is one of `DECODERS`."""
    if name not in DECODERS:
        raise WeakTrError(f"unknown decoder {name!r}", hint=f"use {' or '.join(DECODERS)}")
