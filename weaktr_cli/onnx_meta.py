"""The metadata weaktr writes into an exported ONNX model, and its parser (no torch).

`weaktr_cli.export` writes `build_metadata(...)` into the model's `metadata_props` (every value
a string, JSON where structured; `METADATA_KEYS` documents each key);
`weaktr_cli.onnx_infer` reads it back with `OnnxModelInfo.from_metadata`. A reader refuses a
`weaktr.format_version` newer than `FORMAT_VERSION`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from weaktr_cli.errors import WeakTrError, refuse_newer

__all__ = [
    "FORMAT_VERSION",
    "INPUT_NAME",
    "METADATA_KEYS",
    "OUTPUT_NAMES",
    "OnnxModelInfo",
    "build_metadata",
    "min_input_size",
]

#: version of the metadata layout below; readers refuse newer ones
FORMAT_VERSION = 1
INPUT_NAME = "pixels"
OUTPUT_NAMES = {"segmenter": "logits", "cam": "cams"}

#: metadata_props written into every exported model (values are strings; JSON where noted)
METADATA_KEYS = {
    "weaktr.format_version": "int, version of this metadata layout",
    "weaktr.kind": '"segmenter" or "cam"',
    "weaktr.version": "weaktr version that exported the model",
    "weaktr.class_names": "JSON list; class id i is class_names[i], 0 = background",
    "weaktr.mean": "JSON [r, g, b], normalisation mean on 0-1 pixels (applied in the graph)",
    "weaktr.std": "JSON [r, g, b], normalisation std (applied in the graph)",
    "weaktr.patch_size": "int, ViT patch size in pixels",
    "weaktr.crop_size": "int, training crop of the model (default inference window)",
    "weaktr.input_size": "JSON [H, W], the exported (example) input size",
    "weaktr.min_size": "JSON [H, W], the smallest input a dynamic model accepts",
    "weaktr.dynamic": '"true": batch, H, W are free; "false": the input shape is fixed',
    "weaktr.batch_size": "int, the fixed batch size (dynamic models: the example's)",
    "weaktr.layers": "int, decoder layers in the output (1 = last layer only)",
    "weaktr.cam_variant": "CAM models: fine, cross or coarse",
    "weaktr.recipe": "the recipe the model was trained with, when its checkpoint records it: "
                     "`weaktr predict --onnx` applies that recipe's test time, as "
                     "`predict --checkpoint` does",
    "weaktr.input": "JSON {name, dtype, layout, range}",
    "weaktr.output": "JSON {name, dtype, layout, channels}",
    "weaktr.extra": "JSON object: caller-supplied provenance (checkpoint, sha256, ...)",
}


def min_input_size(kind: str, patch: int) -> tuple[int, int]:
    """The smallest (H, W) an exported model of `kind` accepts."""
    # Segmenter: padded up to whole patches, a 1-patch grid breaks timm's reshapes.
    # CAM: floor division drops the remainder, so two whole patches are needed.
    side = patch + 1 if kind == "segmenter" else 2 * patch
    return side, side


def _json(value: Any) -> str:
    return json.dumps(value, default=str)


def build_metadata(
    *,
    kind: str,
    class_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    patch: int,
    crop: int,
    shape: tuple[int, int, int, int],
    dynamic: bool,
    layers: int,
    variant: str | None,
    extra: Mapping[str, Any] | None,
    weaktr_version: str,
    recipe: str | None = None,
) -> dict[str, str]:
    """The `metadata_props` of an exported model (`METADATA_KEYS`)."""
    b, _, h, w = shape
    dims = "B, 3, H, W" if dynamic else f"{b}, 3, {h}, {w}"
    if kind == "segmenter":
        out_layout = "B, L, K, H, W" if layers > 1 else "B, K, H, W"
        channels = "K = len(class_names); channel k is class id k"
        output = {"name": OUTPUT_NAMES[kind], "dtype": "float32", "layout": out_layout,
                  "channels": channels, "meaning": "logits (softmax over K = probabilities)"}
    else:
        output = {"name": OUTPUT_NAMES[kind], "dtype": "float32", "layout": "B, C, H // p, W // p",
                  "channels": "C = len(class_names) - 1; channel c is class id c + 1",
                  "meaning": f"{variant} class activation maps (non-negative, unnormalised)"}
    meta = {
        "weaktr.format_version": str(FORMAT_VERSION),
        "weaktr.kind": kind,
        "weaktr.version": weaktr_version,
        "weaktr.class_names": _json(list(class_names)),
        "weaktr.mean": _json([float(v) for v in mean]),
        "weaktr.std": _json([float(v) for v in std]),
        "weaktr.patch_size": str(patch),
        "weaktr.crop_size": str(crop),
        "weaktr.input_size": _json([h, w]),
        "weaktr.min_size": _json(list(min_input_size(kind, patch))),
        "weaktr.dynamic": "true" if dynamic else "false",
        "weaktr.batch_size": str(b),
        "weaktr.layers": str(layers),
        "weaktr.input": _json({
            "name": INPUT_NAME, "dtype": "float32", "layout": dims,
            "range": "RGB 0-255, not normalised (mean/std are applied in the graph)",
        }),
        "weaktr.output": _json(output),
        "weaktr.extra": _json(dict(extra or {})),
    }
    if variant is not None:
        meta["weaktr.cam_variant"] = variant
    if recipe is not None:
        meta["weaktr.recipe"] = recipe
    return meta


@dataclass(frozen=True)
class OnnxModelInfo:
    """The `weaktr.*` metadata of an exported model, parsed."""

    kind: str
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    patch_size: int
    crop_size: int
    input_size: tuple[int, int]
    min_size: tuple[int, int]
    dynamic: bool
    batch_size: int
    layers: int
    input_name: str
    output_name: str
    weaktr_version: str
    cam_variant: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None  # the training recipe (None: not recorded)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_metadata(cls, props: Mapping[str, str], source: str = "the model") -> OnnxModelInfo:
        """Parse `metadata_props`; raises `WeakTrError` when a key is missing or malformed."""

        def get(key: str) -> str:
            full = f"weaktr.{key}"
            if full not in props:
                raise WeakTrError(
                    f"{source} has no {full!r} metadata: not exported by weaktr",
                    hint="export it with `weaktr export`",
                )
            return props[full]

        def load(key: str) -> Any:
            try:
                return json.loads(get(key))
            except ValueError as exc:
                raise WeakTrError(f"{source}: metadata 'weaktr.{key}' is not valid JSON") from exc

        try:
            version = int(get("format_version"))
            refuse_newer(f"{source} uses weaktr ONNX metadata version", version, FORMAT_VERSION)
            layer_count = int(get("layers"))
            info = cls(
                kind=get("kind"),
                class_names=tuple(str(n) for n in load("class_names")),
                mean=tuple(float(v) for v in load("mean")),
                std=tuple(float(v) for v in load("std")),
                patch_size=int(get("patch_size")),
                crop_size=int(get("crop_size")),
                input_size=_pair(load("input_size")),
                min_size=_pair(load("min_size")),
                dynamic=get("dynamic") == "true",
                batch_size=int(get("batch_size")),
                layers=layer_count,
                input_name=str(load("input")["name"]),
                output_name=str(load("output")["name"]),
                weaktr_version=get("version"),
                cam_variant=props.get("weaktr.cam_variant"),
                extra=dict(load("extra")),
                recipe=props.get("weaktr.recipe") or None,
            )
        except (TypeError, KeyError, ValueError) as exc:
            raise WeakTrError(f"{source} has malformed weaktr metadata: {exc}") from exc
        return info


def _pair(value: Any) -> tuple[int, int]:
    a, b = value
    return int(a), int(b)
