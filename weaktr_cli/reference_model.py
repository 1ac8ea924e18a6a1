"""Run a released reference (hustvl/WeakTr) segmentation checkpoint as the reference does.

`open_reference_segmenter` loads the file strictly (`models.reference_segmenter`) and returns
the model with the same kind of metadata `retrain.load_segmenter` gives for a weaktr checkpoint;
`reference_predict_settings` is the reference's test time for it (docs/REPRODUCING.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weaktr_cli.errors import WeakTrError
from weaktr_cli.models.segmenter import Segmenter
from weaktr_cli.predict import PredictSettings

__all__ = [
    "REFERENCE_IM_SIZE",
    "REFERENCE_NORMALIZATIONS",
    "describe_reference_checkpoint",
    "open_reference_segmenter",
    "reference_dataset_name",
    "reference_predict_settings",
]

#: The reference's test-time base size for VOC and COCO (OnlineRetraining/segm/config.yml).
REFERENCE_IM_SIZE = 520
#: The reference's normalisation names -> weaktr's (`retrain.NORMALIZATIONS`).
REFERENCE_NORMALIZATIONS = {"deit": "imagenet-rounded", "vit": "inception"}
#: The reference's default window stride (config.yml window_stride for VOC and COCO).
_DEFAULT_STRIDE = 320
#: Test-time CRF preset per dataset.
_TEST_CRF = {"voc": "voc-test", "coco": "coco-test"}


def reference_dataset_name(n_cls: int) -> str | None:
    """"voc" for 21 classes, "coco" for 91, else None (the user names the dataset)."""
    return {21: "voc", 91: "coco"}.get(n_cls)


def open_reference_segmenter(
    path: str | Path,
    *,
    normalization: str | None = None,
    num_heads: int | None = None,
) -> tuple[Segmenter, dict[str, Any]]:
    """The reference checkpoint at `path` as a weaktr `Segmenter` (eval mode) and its metadata.

    normalization: "deit" or "vit"; default what `variant.yml` beside the file says. Without
    either, raises `WeakTrError` (DeiT-S and ViT-S checkpoints have the same shapes).
    meta: {"model": {"img_size", "normalization", "n_cls", "decoder_layers"}, "dataset",
    "reference": {the detected sizes, "normalization", "window_stride", "variant_yml"}}; the
    caller adds "class_names" from the dataset it predicts.
    """
    from weaktr_cli.models.reference_segmenter import load_reference_segmenter, reference_variant

    path = Path(path)
    model, config = load_reference_segmenter(path, num_heads=num_heads)
    variant = reference_variant(path)
    norm = normalization or variant.get("normalization")
    if norm is None:
        raise WeakTrError(
            f"the input normalisation of {path} is unknown (no variant.yml beside it)",
            hint="pass --reference-normalization deit (DeiT-S) or vit (ViT-S, ImageNet-21k)",
        )
    if norm not in REFERENCE_NORMALIZATIONS:
        raise WeakTrError(f"unknown reference normalisation {norm!r}", hint="use deit or vit")
    window = int(variant.get("window_size", config.img_size))
    meta: dict[str, Any] = {
        "kind": "reference-segmenter",
        "dataset": reference_dataset_name(config.n_cls),
        "model": {
            "img_size": window,
            "normalization": REFERENCE_NORMALIZATIONS[norm],
            "n_cls": config.n_cls,
            "decoder_layers": config.decoder_layers,
        },
        "reference": {
            **config.to_dict(),
            "normalization": norm,
            "window_stride": int(variant.get("window_stride", _DEFAULT_STRIDE)),
            "variant_yml": bool(variant),
        },
    }
    return model, meta


def reference_predict_settings(
    meta: dict[str, Any],
    dataset_name: str | None,
    *,
    multiscale: bool,
    crf: str | None = "default",
    flip: bool | None = None,
    batch_size: int = 4,
) -> PredictSettings:
    """The reference's test time for a model opened by `open_reference_segmenter`.

    Multi-scale: ratios 0.5-1.75 with flips; else ratio 1.0 without flip (`OR/eval/miou.py`).
    crf: a preset, None for none, or "default": the dataset's test-time CRF (voc-test,
    coco-test; none for other datasets). The last two decoder layers are fused 0.8 P1 + P2.
    """
    from weaktr_cli.test_time import REFERENCE_RATIOS

    layers = int(meta["model"]["decoder_layers"])
    weights = (0.0,) * (layers - 2) + (0.8, 1.0) if layers >= 2 else (1.0,)
    preset = _TEST_CRF.get(dataset_name or "") if crf == "default" else crf
    return PredictSettings(
        window=int(meta["model"]["img_size"]),
        stride=int(meta["reference"]["window_stride"]),
        scales=REFERENCE_RATIOS if multiscale else (1.0,),
        base_size=REFERENCE_IM_SIZE,
        flip=multiscale if flip is None else flip,
        layer_weights=weights,
        normalization=str(meta["model"]["normalization"]),
        precision="fp32",
        crf=preset,
        batch_size=batch_size,
        procedure="reference",
    )


def describe_reference_checkpoint(path: str | Path) -> dict[str, Any]:
    """What `weaktr inspect` shows for a reference segmentation checkpoint (no model built)."""
    from weaktr_cli.models.reference_segmenter import (
        detect_reference_segmenter,
        reference_variant,
    )
    from weaktr_cli.models.weights import read_state_dict

    path = Path(path)
    config = detect_reference_segmenter(read_state_dict(path))
    variant = reference_variant(path)
    return {
        "kind": "reference segmentation checkpoint (hustvl/WeakTr OnlineRetraining)",
        "model": config.describe(),
        **config.to_dict(),
        "dataset": reference_dataset_name(config.n_cls),
        "normalization": variant.get("normalization", "unknown: pass --reference-normalization"),
        "variant_yml": bool(variant),
    }
