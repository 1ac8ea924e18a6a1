"""Load a trained weaktr model from its checkpoint: one function for both kinds.

A checkpoint (`weaktr_cli.checkpoints`) records its kind ("cam" from train-cam, "segmenter"
from retrain) and the model's build arguments under meta["model"]; `load_model` rebuilds the
module with the class's `from_config` and loads the weights strictly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from weaktr_cli.checkpoints import load_checkpoint
from weaktr_cli.errors import WeakTrError
from weaktr_cli.models.cam_vit import WeakTrCAM
from weaktr_cli.models.segmenter import Segmenter
from weaktr_cli.settings import resolve_normalization

__all__ = ["MODEL_KINDS", "load_cam_model", "load_model", "load_segmenter", "segmenter_meta"]

#: checkpoint kind -> the model class that rebuilds it
MODEL_KINDS: dict[str, type[WeakTrCAM] | type[Segmenter]] = {
    "cam": WeakTrCAM,
    "segmenter": Segmenter,
}


def segmenter_meta(model: Segmenter, arch: str, normalization: str) -> dict[str, Any]:
    """meta["model"] of a segmenter checkpoint: the registry name `arch` (for people), the
    build arguments (`Segmenter.config`, the backbone spelled out) and the input
    normalisation ("auto" resolved for `arch`)."""
    return {"arch": arch, **model.config(),
            "normalization": resolve_normalization(normalization, arch)}


def load_model(path: str | Path, kind: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A trained model (eval mode) and its checkpoint metadata; `kind` ("cam" or
    "segmenter") refuses a checkpoint of the other kind, None takes either."""
    from weaktr_cli.models.weights import strict_load

    if kind is not None and kind not in MODEL_KINDS:
        raise WeakTrError(f"unknown model kind {kind!r}", hint=f"use {', '.join(MODEL_KINDS)}")
    state, meta = load_checkpoint(path, kind=kind)
    found = meta.get("kind")
    if found not in MODEL_KINDS:
        raise WeakTrError(f"{path} is a {found!r} checkpoint, not a model",
                          hint=f"pass a {' or '.join(MODEL_KINDS)} checkpoint")
    config = {k: v for k, v in meta["model"].items() if k not in _NOT_BUILD_ARGS[found]}
    model = MODEL_KINDS[found].from_config(config)
    strict_load(model, state, what=f"checkpoint {path}")
    return model.eval(), meta


#: meta["model"] entries that describe the model without being build arguments
_NOT_BUILD_ARGS = {"cam": (), "segmenter": ("arch", "normalization")}


def load_cam_model(path: str | Path) -> tuple[WeakTrCAM, dict[str, Any]]:
    """A trained CAM model (eval mode) and its checkpoint metadata."""
    model, meta = load_model(path, kind="cam")
    assert isinstance(model, WeakTrCAM)
    return model, meta


def load_segmenter(path: str | Path) -> tuple[Segmenter, dict[str, Any]]:
    """A retrained Segmenter (eval mode) and its checkpoint metadata.

    meta["model"]["normalization"] names the input normalisation (`NORMALIZATIONS`);
    meta["class_names"] the classes of the outputs; meta["train"] the `RetrainConfig`.
    """
    model, meta = load_model(path, kind="segmenter")
    assert isinstance(model, Segmenter)
    return model, meta
