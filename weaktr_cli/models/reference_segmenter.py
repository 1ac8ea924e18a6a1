"""The reference's released online-retraining checkpoints -> weaktr's `Segmenter`, strictly.

hustvl/WeakTr saves `{"model": state_dict, "optimizer": ..., "n_cls": ..., "epoch": ...}` from
its Segmenter (`MultiSegmenter` at evaluation; the same parameters). Its keys
(hustvl/WeakTr 0ff9d9a OnlineRetraining/segm/model/vit.py:38-98, segm/model/blocks.py:83-98,
segm/model/decoder.py:37-74):

    encoder.cls_token (1, 1, D)            encoder.pos_embed (1, 1 + g*g, D)   g = crop / p
    encoder.patch_embed.proj.{weight,bias} encoder.blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,
    encoder.norm.{weight,bias}                                         mlp.fc1,mlp.fc2}.*
    encoder.head.{weight,bias} (1000, D)   ImageNet head, never used by the segmenter: dropped
    decoder.cls_emb (1, n_cls, D)          decoder.proj_dec.{weight,bias}
    decoder.proj_patch / proj_classes (D, D)  decoder.decoder_norm.* / mask_norm.* (n_cls)
    decoder.blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*

Every other key maps one-to-one onto weaktr's `Segmenter` (timm's ViT and block names). What
the tensors do not say: the head count (the reference always uses width // 64, ViT-S 6) and
the input normalisation (DeiT-S: ImageNet statistics, ViT-S: 0.5/0.5), which the reference
keeps in a `variant.yml` next to the checkpoint; `reference_variant` reads it.

The model is rebuilt as the reference computes it: LayerNorm eps 1e-5 everywhere (PyTorch's
default in its blocks) and the positional embedding resampled bilinearly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from weaktr_cli.errors import WeakTrError
from weaktr_cli.models.registry import ArchSpec
from weaktr_cli.models.segmenter import Segmenter, build_segmenter
from weaktr_cli.models.weights import read_state_dict, strict_load

__all__ = [
    "REFERENCE_NORM_EPS",
    "ReferenceSegmenterConfig",
    "detect_reference_segmenter",
    "load_reference_segmenter",
    "reference_segmenter_state",
    "reference_variant",
]

#: nn.LayerNorm's default, which the reference's ViT blocks and decoder use.
REFERENCE_NORM_EPS = 1e-5
_ENCODER_BLOCK = re.compile(r"encoder\.blocks\.(\d+)\.")
_DECODER_BLOCK = re.compile(r"decoder\.blocks\.(\d+)\.")
_DROPPED = ("encoder.head.weight", "encoder.head.bias")


@dataclass(frozen=True)
class ReferenceSegmenterConfig:
    """A reference segmentation checkpoint's model, read from its tensor shapes."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    img_size: int  #: the training crop (the positional embedding's grid x patch)
    n_cls: int
    decoder_layers: int
    decoder_mlp_ratio: float

    def arch(self) -> ArchSpec:
        return ArchSpec("reference-segmenter", self.patch_size, self.embed_dim, self.depth,
                        self.num_heads, self.img_size, self.mlp_ratio,
                        description="shapes read from a reference segmentation checkpoint")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (f"ViT patch {self.patch_size}, width {self.embed_dim}, depth {self.depth}, "
                f"{self.num_heads} heads, trained at {self.img_size} px; mask-transformer "
                f"decoder with {self.decoder_layers} layers; {self.n_cls} classes")


def _need(state: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise WeakTrError(
            f"not a reference (hustvl/WeakTr) segmentation checkpoint: key {key!r} is missing",
            hint="--reference-checkpoint takes the OnlineRetraining checkpoint.pth; a weaktr "
                 "checkpoint goes to --checkpoint",
        )
    return state[key]


def _count(state: Mapping[str, Tensor], pattern: re.Pattern[str]) -> int:
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def detect_reference_segmenter(
    state: Mapping[str, Tensor],
    *,
    num_heads: int | None = None,
) -> ReferenceSegmenterConfig:
    """The model a reference segmentation state dict holds (see the module docstring).

    num_heads: the encoder's and decoder's head count; default the reference's width // 64.
    Raises `WeakTrError` for a state dict of another layout.
    """
    if "encoder.dist_token" in state:
        raise WeakTrError("distilled DeiT encoders (encoder.dist_token) are not supported",
                          hint="WeakTr's released models use deit_small_patch16_224 / ViT-S")
    if "decoder.head.weight" in state:
        raise WeakTrError("reference checkpoints with a linear decoder are not supported",
                          hint="WeakTr's released models use the mask transformer")
    proj = _need(state, "encoder.patch_embed.proj.weight")  # (D, 3, p, p)
    dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    positions = int(_need(state, "encoder.pos_embed").shape[1]) - 1
    grid = math.isqrt(max(positions, 0))
    if grid == 0 or grid * grid != positions:
        raise WeakTrError(f"encoder.pos_embed holds {positions} patch positions: not a square "
                          "training crop")
    depth = _count(state, _ENCODER_BLOCK)
    layers = _count(state, _DECODER_BLOCK)
    if depth == 0 or layers == 0:
        raise WeakTrError("not a reference segmentation checkpoint: no encoder or decoder blocks")
    heads = num_heads if num_heads is not None else max(1, dim // 64)
    if heads < 1 or dim % heads:
        raise WeakTrError(f"width {dim} does not split into {heads} heads",
                          hint="give a head count that divides the width")
    cls_emb = _need(state, "decoder.cls_emb")  # (1, n_cls, D)
    if int(cls_emb.shape[-1]) != dim:
        raise WeakTrError(f"decoder width {int(cls_emb.shape[-1])} differs from the encoder's "
                          f"{dim}; the reference's decoder is as wide as its encoder")
    fc1 = _need(state, "encoder.blocks.0.mlp.fc1.weight")
    dec_fc1 = _need(state, "decoder.blocks.0.mlp.fc1.weight")
    return ReferenceSegmenterConfig(
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=int(fc1.shape[0]) / dim,
        img_size=grid * patch,
        n_cls=int(cls_emb.shape[1]),
        decoder_layers=layers,
        decoder_mlp_ratio=int(dec_fc1.shape[0]) / dim,
    )


def reference_segmenter_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state dict for weaktr's `Segmenter`: the reference's keys minus `encoder.head.*`."""
    return {k: v for k, v in state.items() if k not in _DROPPED}


def build_reference_model(config: ReferenceSegmenterConfig) -> Segmenter:
    """A randomly initialised `Segmenter` computing as the reference's (eps 1e-5, bilinear)."""
    return build_segmenter(
        config.n_cls,
        config.arch(),
        img_size=config.img_size,
        drop_path_rate=0.0,
        norm_eps=REFERENCE_NORM_EPS,
        pos_embed_interp="bilinear",
        decoder_layers=config.decoder_layers,
        decoder_heads=config.num_heads,
        decoder_mlp_ratio=config.decoder_mlp_ratio,
    )


def _check_option(name: str, given: int | None, found: int, path: Path) -> None:
    if given is not None and given != found:
        raise WeakTrError(f"{path} has {name} {found}, not {given}",
                          hint=f"leave {name} out to use what the checkpoint holds")


def load_reference_segmenter(
    path: str | Path,
    *,
    num_heads: int | None = None,
    n_cls: int | None = None,
    decoder_layers: int | None = None,
    img_size: int | None = None,
) -> tuple[Segmenter, ReferenceSegmenterConfig]:
    """A reference segmentation checkpoint as a weaktr `Segmenter` (eval mode), strictly loaded.

    Every size comes from the tensors; `n_cls`, `decoder_layers` and `img_size`, when given,
    must agree with them (`num_heads` is not stored, so it is taken as given). A missing,
    unexpected or mis-shaped key raises one `WeakTrError` naming it.
    """
    path = Path(path)
    state = read_state_dict(path)
    config = detect_reference_segmenter(state, num_heads=num_heads)
    _check_option("classes", n_cls, config.n_cls, path)
    _check_option("decoder layers", decoder_layers, config.decoder_layers, path)
    _check_option("training size", img_size, config.img_size, path)
    model = build_reference_model(config)
    strict_load(model, reference_segmenter_state(state),
                what=f"reference segmentation checkpoint {path}")
    return model.eval(), config


class _VariantLoader:
    """yaml.SafeLoader that also reads the `!!python/tuple` tags `yaml.dump` writes."""

    @staticmethod
    def loader() -> Any:
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        def tuple_node(loader: Any, node: Any) -> list[Any]:
            return list(loader.construct_sequence(node))

        Loader.add_constructor("tag:yaml.org,2002:python/tuple", tuple_node)
        return Loader


def reference_variant(path: str | Path) -> dict[str, Any]:
    """What the `variant.yml` beside a reference checkpoint says about test time, or {}.

    Keys (when present): "normalization" ("deit" or "vit"), "window_size" (the training crop)
    and "window_stride", read as the reference's evaluation reads them (hustvl/WeakTr 0ff9d9a
    OnlineRetraining/segm/eval/miou.py:256-263; written by segm/train.py:161-210).
    """
    variant_path = Path(path).parent / "variant.yml"
    if not variant_path.is_file():
        return {}
    import yaml

    try:
        data = yaml.load(variant_path.read_text(), Loader=_VariantLoader.loader())
    except (OSError, yaml.YAMLError) as exc:
        raise WeakTrError(f"cannot read {variant_path}: {exc}") from exc
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    net = data.get("net_kwargs") or {}
    dataset = data.get("dataset_kwargs") or {}
    inference = data.get("inference_kwargs") or {}
    for section in (net, dataset):  # the evaluation reads dataset_kwargs' (the same value)
        if isinstance(section, dict) and section.get("normalization") in ("deit", "vit"):
            out["normalization"] = section["normalization"]
    if isinstance(dataset, dict) and isinstance(dataset.get("crop_size"), int):
        out["window_size"] = dataset["crop_size"]
    if isinstance(inference, dict) and isinstance(inference.get("window_stride"), int):
        out["window_stride"] = inference["window_stride"]
    return out
