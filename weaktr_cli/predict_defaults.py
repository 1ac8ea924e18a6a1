"""The test time a model gets by default, whichever runtime runs it (torch-free).

`predict --checkpoint`, `predict --onnx` and `export-onnx` all ask here, so a checkpoint and
its ONNX export predict the same masks. The recipe is --recipe, else the one the model was
trained with (a segmenter checkpoint records it as "recipe", its export as `weaktr.recipe`),
else that of --data's dataset or of the model's (older checkpoints record no recipe); its
predict settings with the command's flags are what both predictors run, each taking window,
stride and normalisation from its model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from weaktr_cli.settings import PredictSettings

__all__ = ["MULTISCALE", "crf_choice", "fuses_layers", "predict_recipe", "predict_settings"]

#: docs/method.md, phase 4 inference: ratios 0.5-1.75 of the image
MULTISCALE = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def predict_recipe(recipe: str | None, *, data: str | None, trained: str | None,
                   model_dataset: str | None) -> str:
    """The recipe whose test time a model gets: `recipe` (--recipe) if given; else `trained`,
    the recipe the model was trained with, when this weaktr knows it; else that of `data`
    (--data), or of `model_dataset`, the dataset the model was trained on."""
    from weaktr_cli.recipes import PREDICT_RECIPES, qualify_recipe

    if recipe is None and trained is not None and trained in PREDICT_RECIPES:
        return trained
    return qualify_recipe(recipe, str(data or model_dataset or "shapes"))


def crf_choice(crf: str | None, recipe_crf: str | None) -> str | None:
    """--crf: a preset name, "none", or unset for the recipe's."""
    if crf is None:
        return recipe_crf
    return None if crf.lower() == "none" else crf


def predict_settings(recipe: str, *, crf: str | None = None, flip: bool | None = None,
                     multiscale: bool = False, fuse_layers: bool = False) -> PredictSettings:
    """Recipe `recipe`'s predict settings with --crf, --flip, --multiscale and --fuse-layers."""
    from weaktr_cli.recipes import resolve

    base: PredictSettings = resolve("predict", recipe)
    overrides: dict[str, Any] = {"crf": crf_choice(crf, base.crf)}
    if flip is not None:
        overrides["flip"] = flip
    if multiscale:
        overrides["scales"] = MULTISCALE
        if flip is None and base.procedure == "reference":
            overrides["flip"] = True  # the reference's multi-scale always adds flips
    if fuse_layers:
        overrides["layer_weights"] = (0.8, 1.0)
    return dataclasses.replace(base, **overrides)


def fuses_layers(trained: str | None, model_dataset: str | None, decoder_layers: int) -> bool:
    """Whether the default test time of a model with `decoder_layers` layers mixes several
    of them (the reference's 0.8 P1 + P2), so that its ONNX export needs every layer."""
    name = predict_recipe(None, data=None, trained=trained, model_dataset=model_dataset)
    return decoder_layers > 1 and predict_settings(name).layer_weights is not None
