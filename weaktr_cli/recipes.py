"""Named recipes: per dataset, the settings of every phase (CAM training, CAM dump, seeds,
retraining, prediction).

`CAM_RECIPES["voc"]` and `["coco"]` are the paper's (METHOD.md Phase 1/2, DeiT-S from an
ImageNet checkpoint). `["shapes"]` is the built-in dataset's CPU recipe: a tiny ViT trained from
scratch in about a minute on 2 cores. Every shapes choice below was measured on the built-in
dataset (CAM mIoU of the 2000 train images at the best background threshold, model taken at
the last epoch, seeds 504/505/506); benchmarks/cam_ablation.py reruns the fusion ablation.

Recipes are plain `CamTrainConfig` / `CamSettings` values: take one and override fields with
`dataclasses.replace(CAM_RECIPES["shapes"], seed=1)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from weaktr_cli.cams import CamSettings
from weaktr_cli.errors import WeakTrError
from weaktr_cli.predict import PredictSettings
from weaktr_cli.retrain import RETRAIN_RECIPES as _RETRAIN_RECIPES
from weaktr_cli.retrain import RetrainConfig
from weaktr_cli.runtime import cpu_bf16_is_fast
from weaktr_cli.train_cam import CamTrainConfig

__all__ = [
    "CAM_RECIPES",
    "DUMP_RECIPES",
    "PREDICT_RECIPES",
    "RETRAIN_FROM_CAM",
    "RETRAIN_RECIPES",
    "SEED_RECIPES",
    "SeedRecipe",
    "cam_recipe",
    "dump_recipe",
    "recipe_names",
]

CAM_RECIPES: dict[str, CamTrainConfig] = {
    # Measured on 2 cores (AMD EPYC with AVX512-BF16), shapes train split, cross CAM dumped at
    # scales 1.0 + 1.5 with flips. From scratch, CAMs peak while the classifier is still weak
    # and then shrink to the most discriminative parts, so the recipe is small and short:
    "shapes": CamTrainConfig(
        # tiny-p8 (12x12 grid at 96 px). dim 192 / depth 6 classifies better but localises
        # worse (71.3 vs 76.9 at 4 epochs); patch 6 scored 79.7 but costs 1.8x and its patch
        # embedding does not fit the tiny-p8 segmenter that retraining initialises from it.
        arch="tiny-p8",
        # 3 epochs (93 steps): 77.7 / 75.6 / 75.8 (seeds 504/505/506); 4 epochs: 76.9 / 73.8;
        # 8 epochs: 76.4 (seed 504). The coarse CAM drops faster with length (73.7 -> 68.8 -> 66.2).
        epochs=3,
        batch_size=64,
        # lr 5e-4 at batch 64 (DeiT scaling: base 4e-3 per 512), half an epoch of warm-up.
        base_lr=4e-3,
        weight_decay=0.05,
        warmup_epochs=0.5,
        input_size=96,
        # Small crops drop objects of multi-object images, leaving wrong image-level labels.
        crop_scale=(0.5, 1.0),
        # No RandAugment: colour is half of every class here; erasing and stochastic depth are
        # regularisers for long schedules, not for 3 epochs.
        randaugment=False,
        random_erasing=0.0,
        drop_path=0.0,
        # bf16 autocast where the CPU has native bf16: 1.7x the fp32 speed (190 vs 110 img/s,
        # batch 64), the same CAM mIoU (76.89 vs 76.90) and still bit-identical reruns.
        # Emulated bf16 is slower than fp32, hence the check.
        precision="bf16" if cpu_bf16_is_fast() else "auto",
        cache_images=True,  # the whole split is ~55 MB decoded: skip PNG decoding after epoch 1
    ),
    # The paper's VOC recipe (CamTrainConfig's defaults): DeiT-S, batch 64, 60 epochs, AdamW
    # base lr 6e-4 per 512, weight decay 0.03 (the reference's), 5 warm-up epochs, cosine to
    # 1e-5, RandomResizedCrop 224 (0.08-1), flip, RandAugment m9, random erasing 0.25.
    "voc": CamTrainConfig(),
    # COCO differs only in its base learning rate.
    "coco": CamTrainConfig(base_lr=2e-4),
}

DUMP_RECIPES: dict[str, CamSettings] = {
    # Cross-attention x coarse CAM: the fine CAM fails from scratch (2-3 mIoU: the background
    # attends to objects, METHOD.md) and the coarse CAM alone scores 4-8 points lower.
    # Scales 1.0 + 1.5 (an 18x18 grid at 1.5): 76.9 vs 76.4 for 1.0 + 1.25, 77.4 with all
    # three, at 2/3 of the cost. The cross CAM is peaky (best background threshold 0.16-0.18
    # at power 1); power 0.5 moves it to ~0.41, inside the usual 0.3-0.6 sweep, so the seeds'
    # background level needs no pixel labels to choose.
    "shapes": CamSettings(scales=(1.0, 1.5), flip=True, variant="cross", power=0.5),
    # The reference's dumps: the fine CAM at 1.0 and 1.2 (VOC), 1.0, 0.8 and 1.2 (COCO), + flip.
    "voc": CamSettings(scales=(1.0, 1.2), flip=True, variant="fine"),
    "coco": CamSettings(scales=(1.0, 0.8, 1.2), flip=True, variant="fine"),
}


def recipe_names() -> list[str]:
    """Datasets with a recipe, in table order."""
    return list(CAM_RECIPES)


def _lookup(table: dict[str, Any], name: str, what: str) -> Any:
    try:
        return table[name]
    except KeyError:
        raise WeakTrError(
            f"no {what} recipe for {name!r}", hint=f"choose one of: {', '.join(table)}"
        ) from None


def cam_recipe(name: str) -> CamTrainConfig:
    """The CAM training recipe for dataset `name` (a fresh copy; edits do not leak)."""
    config: CamTrainConfig = _lookup(CAM_RECIPES, name, "CAM training")
    return dataclasses.replace(config)


def dump_recipe(name: str) -> CamSettings:
    """The CAM dump settings for dataset `name` (`CamSettings` is frozen)."""
    settings: CamSettings = _lookup(DUMP_RECIPES, name, "CAM dump")
    return settings


# ----------------------------------------------------------------------------- later phases


@dataclass(frozen=True)
class SeedRecipe:
    """How `crf` turns CAMs into seeds: background level, CRF preset (None: no CRF), unary."""

    bg: float
    preset: str | None
    unary: str = "hard"


SEED_RECIPES: dict[str, SeedRecipe] = {
    # METHOD.md Phase 3: background 0.43 (VOC) / 0.42 (COCO) with the matching CRF sets.
    "voc": SeedRecipe(bg=0.43, preset="voc"),
    "coco": SeedRecipe(bg=0.42, preset="coco"),
    # The built-in dataset keeps VOC's level: chosen without pixel labels (the CAM power of its
    # dump recipe puts the usual 0.3-0.6 range where its CAMs separate objects).
    "shapes": SeedRecipe(bg=0.43, preset="voc"),
    "smoke": SeedRecipe(bg=0.43, preset="voc"),
}

#: Retraining recipes live beside RetrainConfig; re-exported so every phase's recipe is here.
RETRAIN_RECIPES: dict[str, RetrainConfig] = {
    **_RETRAIN_RECIPES,
    # A few optimizer steps of a micro model: the end-to-end tests' plumbing check.
    "smoke": RetrainConfig(arch="micro", crop_size=32, batch_size=4, iterations=4,
                           optimizer="adamw", lr=1e-3, encoder_lr_mult=1.0, tau="auto",
                           tau_auto_steps=2, clip_patch=8, drop_path=0.0, log_every=2),
}

#: Recipes whose retraining encoder starts from the phase-1 CAM backbone when no ImageNet
#: weights are given (`weaktr retrain --pretrained cam.ckpt`). Not "shapes": its CAM backbone
#: separates colours only (val mAP 0.65) and did not help (29.4 vs 30.4 train mIoU, measured),
#: and its retraining encoder is the conv-stem `tiny-c8`. "smoke" keeps the path exercised.
RETRAIN_FROM_CAM: frozenset[str] = frozenset({"smoke"})

#: Test-time settings; `predict` fills window, stride and normalisation from the checkpoint.
PREDICT_RECIPES: dict[str, PredictSettings] = {
    "voc": PredictSettings(),
    "coco": PredictSettings(),
    # The paper's headline numbers use test-time CRF (METHOD.md: 74.0 with CRF vs 73.0). On
    # shapes it sharpens the stride-8 model's outlines: 82.5 vs 79.8 train, 64.0 vs 61.9 val.
    "shapes": PredictSettings(crf="voc-test"),
    "smoke": PredictSettings(flip=False),
}

CAM_RECIPES["smoke"] = CamTrainConfig(
    arch="micro", epochs=1, batch_size=8, base_lr=4e-3, warmup_epochs=0.0, input_size=32,
    crop_scale=(0.5, 1.0), randaugment=False, random_erasing=0.0, drop_path=0.0,
    precision="fp32", seed=0)
DUMP_RECIPES["smoke"] = CamSettings(scales=(1.0,), flip=True, variant="cross", power=0.5)
