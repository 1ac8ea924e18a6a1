"""Named recipes: per dataset, the settings of every phase.

`resolve(phase, name, **overrides)` is the one way in: the recipe `name` of `phase` ("cam",
"dump", "seeds", "retrain", "predict") with the overrides that are not None, one error (listing
the valid names) for an unknown one. `recipe_for_dataset` names the recipe a dataset gets when
the user names none (VOC's for a dataset without one).

"voc" and "coco" are the paper's (docs/method.md). "shapes" is the built-in dataset's CPU
recipe: a tiny ViT trained from scratch in about a minute on 2 cores; every choice was measured
on the built-in dataset (docs/experiments.md; benchmarks/cam_ablation.py reruns the fusion
ablation).

The tables hold plain values (`weaktr_cli.settings`) and import without torch, so the `crf`
and `predict --onnx` paths stay light; the CAM training and retraining tables are built on
first use (the reference recipes are built from their own tables). The shapes recipes run in
fp32 on every CPU, so they give the same result with or without native bf16.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from weaktr_cli.errors import WeakTrError
from weaktr_cli.settings import CamSettings, CamTrainConfig, PredictSettings, RetrainConfig

if TYPE_CHECKING:  # built on first use by `__getattr__`
    CAM_RECIPES: dict[str, CamTrainConfig]
    RETRAIN_RECIPES: dict[str, RetrainConfig]

__all__ = [
    "CAM_RECIPES",
    "DUMP_RECIPES",
    "PHASES",
    "PREDICT_RECIPES",
    "PRETRAINED_RECIPES",
    "RETRAIN_FROM_CAM",
    "RETRAIN_RECIPES",
    "SEED_RECIPES",
    "SeedRecipe",
    "cam_recipe",
    "check_encoder_init",
    "dump_recipe",
    "qualify_recipe",
    "recipe_for_dataset",
    "recipe_help",
    "recipe_names",
    "register",
    "resolve",
]


def _native_bf16() -> str:
    """"bf16" where the CPU runs bf16 natively (1.7x fp32 for the shapes models, the same
    mIoU, still bit-identical reruns), else "auto" (fp32 on CPU); emulated bf16 is far slower
    than fp32 and is never chosen."""
    from weaktr_cli.runtime import cpu_bf16_is_fast

    return "bf16" if cpu_bf16_is_fast() else "auto"


def _cam_recipes() -> dict[str, CamTrainConfig]:
    native_bf16 = _native_bf16()
    return {
        # From scratch, CAMs peak while the classifier is still weak and then shrink to the most
        # discriminative parts, so the recipe is small and short (docs/experiments.md).
        "shapes": CamTrainConfig(
            # tiny-p8: a 12x12 grid at 96 px; wider / deeper or patch 6 localised worse or cost
            # more, and its patch embedding must fit the segmenter retraining may start from.
            arch="tiny-p8",
            # Short: CAMs shrink to the most discriminative parts as training goes on.
            epochs=3,
            batch_size=64,
            # lr 5e-4 at batch 64 (DeiT scaling: base 4e-3 per 512), half an epoch of warm-up.
            base_lr=4e-3,
            weight_decay=0.05,
            warmup_epochs=0.5,
            input_size=96,
            # Small crops drop objects of multi-object images, leaving wrong image-level labels.
            crop_scale=(0.5, 1.0),
            # No RandAugment: colour is half of every class here; erasing and stochastic depth
            # are regularisers for long schedules, not for 3 epochs.
            randaugment=False,
            random_erasing=0.0,
            drop_path=0.0,
            # bf16 only where the CPU has native bf16 (the same mIoU); fp32 elsewhere, since
            # emulated bf16 is ~100x slower. 3 epochs cost 231 CPU-s in fp32 on a 2-core EPYC
            # without bf16 (docs/experiments.md).
            precision=native_bf16,
            cache_images=True,  # the split is ~55 MB decoded: skip PNG decoding after epoch 1
        ),
        # "voc" / "coco" are the reference's release recipes, "<dataset>-paper" its paper's
        # (`_reference_recipes`, docs/REPRODUCING.md).
        **_reference_recipes("cam", CamTrainConfig),
    }


DUMP_RECIPES: dict[str, CamSettings] = {
    # Cross-attention x coarse CAM: the fine CAM fails from scratch (2-3 mIoU: the background
    # attends to objects, docs/method.md) and the coarse CAM alone scores 4-8 points lower.
    # Scales 1.0 + 1.5 (an 18x18 grid at 1.5): 76.9 vs 76.4 for 1.0 + 1.25, 77.4 with all
    # three, at 2/3 of the cost; scale 1.0 alone costs a third but scored 72.5 against 74.6 on
    # val (docs/experiments.md). The cross CAM is peaky (best background threshold 0.16-0.18
    # at power 1); power 0.5 moves it to ~0.41, inside the usual 0.3-0.6 sweep, so the seeds'
    # background level needs no pixel labels to choose.
    "shapes": CamSettings(scales=(1.0, 1.5), flip=True, variant="cross", power=0.5),
}


@dataclass(frozen=True)
class SeedRecipe:
    """How `crf` turns CAMs into seeds: background level, CRF preset (None: no CRF), unary."""

    bg: float
    preset: str | None
    unary: str = "hard"


SEED_RECIPES: dict[str, SeedRecipe] = {
    # The built-in dataset keeps VOC's level: chosen without pixel labels (the CAM power of its
    # dump recipe puts the usual 0.3-0.6 range where its CAMs separate objects).
    "shapes": SeedRecipe(bg=0.43, preset="voc"),
}


def _retrain_recipes() -> dict[str, RetrainConfig]:
    # "voc" is the paper's (ViT-S/16 at 480 px: pass local ImageNet weights as `pretrained`);
    # the paper gives no COCO-specific retraining settings, so "coco" uses the same. "shapes"
    # is sized for the built-in 96 px dataset on a CPU, from scratch. Colour defines its
    # classes, so no photometric distortion; AdamW because SGD at 1e-4 barely moves a randomly
    # initialised encoder; the question is whether the model learns circle vs square, which
    # the seeds cannot teach. A from-scratch encoder learns it only after ~2500 steps of 16,
    # whatever its width; transformer blocks and a final LayerNorm delay that further (one
    # block: 46 val mIoU after 4000 steps against 69 without), so the encoder is the conv
    # stem alone (`tiny-c8-stem`), with a linear decoder: 4000 steps take ~4.5 min on a 2-core
    # CPU without bf16 (issue 16; docs/experiments.md has the measurements).
    # It trains without clipping: clipping hurt at every tau tried on these seeds, whose
    # errors are systematic rather than noise (docs/experiments.md); `--clip` switches it
    # on at the best setting measured, tau auto at 0.3. `--arch tiny-c8 --iterations 4800
    # --lr 1e-3` runs the former hybrid-ViT recipe (~24 min there).
    return {
        **_reference_recipes("retrain", RetrainConfig),
        "shapes": RetrainConfig(
            arch="tiny-c8-stem",
            decoder="linear",
            crop_size=96,
            scale_range=(1.0, 1.0),  # objects keep their size: scale jitter delayed the shapes
            photometric=False,  # colour defines the class here: no hue/saturation jitter
            batch_size=16,
            iterations=4000,
            optimizer="adamw",
            lr=4e-3,  # 2x-4x faster to the shapes than 1e-3 (val mIoU; 8e-3 no better)
            min_lr=1e-5,
            encoder_lr_mult=1.0,
            weight_decay=0.01,
            clip=False,
            tau="auto",
            tau_auto_fraction=0.3,
            clip_patch=24,
            drop_path=0.0,
            # fp32 on every CPU: the step at which the shapes are learnt is not measured in
            # bf16, and fp32 already fits the budget (auto: bf16 on CUDA).
            precision="auto",
            cache_images=True,  # 2000 images of 96 px: decode each PNG once
            log_every=25,
        ),
    }


#: Recipes whose retraining encoder starts from the phase-1 CAM backbone when no ImageNet
#: weights are given. None of the shipped ones: the shapes CAM backbone separates colours only
#: (val mAP 0.65) and did not help (29.4 vs 30.4 train mIoU, measured), and its retraining
#: encoder is a conv-stem hybrid. A recipe registered with `register(...,
#: retrain_from_cam=True)` (the tests' "smoke") takes this path.
RETRAIN_FROM_CAM: set[str] = set()

#: Recipes that fine-tune ImageNet weights (the paper's): without them the model trains from
#: random weights for a schedule sized for fine-tuning (60 GPU epochs of DeiT-S), which is
#: almost always a forgotten --pretrained, so it takes --from-scratch to ask for it.
PRETRAINED_RECIPES: frozenset[str] = frozenset({"voc", "coco"})


def check_encoder_init(recipe: str, pretrained: object | None, from_scratch: bool) -> str | None:
    """Refuse a recipe of `PRETRAINED_RECIPES` without weights unless `from_scratch`; returns
    the note to log about the encoder's start (None when there is nothing to say)."""
    # "voc-release", "coco-paper", ...: the paper recipes' versions fine-tune too.
    if recipe.split("-")[0] not in PRETRAINED_RECIPES or pretrained is not None:
        return None
    if not from_scratch:
        raise WeakTrError(
            f"the {recipe} recipe fine-tunes ImageNet weights; without --pretrained it would "
            "train from random weights for a schedule sized for fine-tuning",
            hint="pass --pretrained FILE (local timm DeiT-S weights, e.g. "
            "deit_small_patch16_224-cd65a155.pth), or --from-scratch to start from random "
            "weights on purpose",
        )
    return (f"[yellow]training from scratch (--from-scratch): the {recipe} recipe was made for "
            "ImageNet weights[/]")

#: Test-time settings; `predict` fills window, stride and normalisation from the checkpoint.
PREDICT_RECIPES: dict[str, PredictSettings] = {
    # The paper's headline numbers use test-time CRF (74.0 with CRF vs 73.0). On shapes it
    # sharpens the stride-8 model's outlines: 82.5 vs 79.8 train, 64.0 vs 61.9 val mIoU.
    # fp32, as every shapes phase: results must not depend on the CPU having native bf16.
    "shapes": PredictSettings(crf="voc-test"),
}

# ----------------------------------------------------------------------------- the reference's

#: The reference's versions as recipes (weaktr_cli.reference_recipes): "paper" is hustvl/WeakTr
#: 3547b87, "release" 0ff9d9a, whose checkpoints users download, and the default for VOC/COCO.
VERSIONS = ("release", "paper")
REFERENCE_DATASETS = ("voc", "coco")


def _reference_recipes(phase: str, make: Callable[..., Any]) -> dict[str, Any]:
    """`voc`, `coco` (= their release recipes), `voc-paper`, `voc-release`, `coco-paper`,
    `coco-release` for `phase`, each built by `make(**the reference's settings)`."""
    from weaktr_cli.reference_recipes import reference_overrides

    out: dict[str, Any] = {}
    for dataset in REFERENCE_DATASETS:
        out[dataset] = make(**reference_overrides(phase, dataset, "release"))
    for dataset in REFERENCE_DATASETS:
        for version in VERSIONS:
            out[f"{dataset}-{version}"] = make(**reference_overrides(phase, dataset, version))
    return out


DUMP_RECIPES.update(_reference_recipes("dump", CamSettings))
SEED_RECIPES.update(_reference_recipes("seeds", SeedRecipe))
PREDICT_RECIPES.update(_reference_recipes("predict", PredictSettings))


def qualify_recipe(recipe: str | None, dataset: str) -> str:
    """The recipe name `--recipe` means for `dataset`: none -> the dataset's
    (`recipe_for_dataset`); "paper" / "release" -> "<dataset>-paper" / "-release" (VOC's for
    a dataset of one's own); any other name as given."""
    if recipe is None:
        return recipe_for_dataset(dataset)
    if recipe in VERSIONS:
        base = dataset if dataset in REFERENCE_DATASETS else "voc"
        return f"{base}-{recipe}"
    return recipe


def recipe_help() -> str:
    """--recipe's help: every recipe there is."""
    return ("Settings of every phase: release (default for voc/coco: hustvl/WeakTr 0ff9d9a), "
            "paper (3547b87), shapes, or a full name: " + ", ".join(_STATIC_NAMES) +
            " (default: the dataset's).")


#: Recipe names known without building the torch-dependent tables (for --help).
_STATIC_NAMES = ("shapes", "voc", "coco", *(f"{d}-{v}" for d in REFERENCE_DATASETS
                                            for v in VERSIONS))

# ----------------------------------------------------------------------------- the resolver

PHASES = ("cam", "dump", "seeds", "retrain", "predict")
_WHAT = {"cam": "CAM training", "dump": "CAM dump", "seeds": "seed", "retrain": "retraining",
         "predict": "prediction"}
_BUILT: dict[str, dict[str, Any]] = {"dump": DUMP_RECIPES, "seeds": SEED_RECIPES,
                                     "predict": PREDICT_RECIPES}
_BUILDERS: dict[str, Callable[[], dict[str, Any]]] = {"cam": _cam_recipes,
                                                      "retrain": _retrain_recipes}


def _table(phase: str) -> dict[str, Any]:
    if phase not in PHASES:
        raise WeakTrError(f"unknown phase {phase!r}", hint=f"choose one of: {', '.join(PHASES)}")
    if phase not in _BUILT:
        _BUILT[phase] = {name: _named(value, name) for name, value in _BUILDERS[phase]().items()}
    return _BUILT[phase]


def _named(value: Any, name: str) -> Any:
    """`value`, naming recipe `name` if its settings record their recipe (`RetrainConfig`:
    the checkpoint keeps it for `predict`)."""
    if any(f.name == "recipe" for f in dataclasses.fields(value)):
        return dataclasses.replace(value, recipe=name)
    return value


def resolve(phase: str, name: str, **overrides: Any) -> Any:
    """The `phase` settings of recipe `name`, with the `overrides` that are not None.

    A fresh value each call: editing it does not change the table.
    """
    table = _table(phase)
    if name not in table:
        raise WeakTrError(f"no {_WHAT[phase]} recipe {name!r}",
                          hint=f"choose one of: {', '.join(table)}")
    return dataclasses.replace(table[name], **{k: v for k, v in overrides.items()
                                               if v is not None})


#: The recipes weaktr ships (the shell completions list these; see `register`).
SHIPPED_RECIPES: tuple[str, ...] = ("shapes", "voc", "coco")


def recipe_names() -> list[str]:
    """Recipes of every phase, in table order (those registered later included)."""
    return list(_table("cam"))


def recipe_for_dataset(dataset_name: str) -> str:
    """The recipe a dataset gets when none is named: its own, else VOC's (the paper's)."""
    # Every recipe has all phases; the seeds table is torch-free (the CAM table asks torch
    # about bf16), so crf and predict --onnx never import torch for this lookup.
    return dataset_name if dataset_name in _table("seeds") else "voc"


def register(name: str, *, cam: CamTrainConfig, dump: CamSettings, seeds: SeedRecipe,
             retrain: RetrainConfig, predict: PredictSettings,
             retrain_from_cam: bool = False) -> None:
    """Add (or replace) recipe `name` for every phase, e.g. a project's own dataset."""
    for phase, value in (("cam", cam), ("dump", dump), ("seeds", seeds), ("retrain", retrain),
                         ("predict", predict)):
        _table(phase)[name] = _named(value, name)
    if retrain_from_cam:
        RETRAIN_FROM_CAM.add(name)
    else:
        RETRAIN_FROM_CAM.discard(name)


def cam_recipe(name: str) -> CamTrainConfig:
    """The CAM training recipe for dataset `name` (a fresh copy; edits do not leak)."""
    config: CamTrainConfig = resolve("cam", name)
    return config


def dump_recipe(name: str) -> CamSettings:
    """The CAM dump settings for dataset `name`."""
    settings: CamSettings = resolve("dump", name)
    return settings


def __getattr__(name: str) -> Any:
    # The torch-dependent tables, built on first use (see the module docstring).
    if name == "CAM_RECIPES":
        return _table("cam")
    if name == "RETRAIN_RECIPES":
        return _table("retrain")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
