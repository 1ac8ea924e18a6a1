"""Named recipes: the CAM training schedule and the CAM dump settings per dataset.

`CAM_RECIPES["voc"]` and `["coco"]` are the paper's (METHOD.md Phase 1/2, DeiT-S from an
ImageNet checkpoint). `["shapes"]` is the built-in dataset's CPU recipe: a tiny ViT trained from
scratch in a few minutes on 2 cores. Every shapes choice below was measured on the built-in
dataset (train split, 2000 images, CAM mIoU at the best background threshold); the numbers are
in the comments and in benchmarks/cam_ablation.py.

Recipes are plain `CamTrainConfig` / `CamSettings` values: take one and override fields with
`dataclasses.replace(CAM_RECIPES["shapes"], seed=1)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from weaktr_cli.cams import CamSettings
from weaktr_cli.errors import WeakTrError
from weaktr_cli.predict import PredictSettings
from weaktr_cli.retrain import RETRAIN_RECIPES as _RETRAIN_RECIPES
from weaktr_cli.retrain import RetrainConfig
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
    "shapes": CamTrainConfig(
        arch="tiny-p8",
        epochs=4,
        batch_size=64,
        base_lr=4e-3,
        weight_decay=0.05,
        warmup_epochs=0.5,
        input_size=96,
        crop_scale=(0.5, 1.0),
        randaugment=False,
        random_erasing=0.0,
        drop_path=0.0,
        precision="fp32",
        cache_images=True,
    ),
    # The paper's VOC recipe (CamTrainConfig's defaults): DeiT-S, batch 64, 60 epochs, AdamW
    # base lr 6e-4 per 512, weight decay 0.03 (the reference's), 5 warm-up epochs, cosine to
    # 1e-5, RandomResizedCrop 224 (0.08-1), flip, RandAugment m9, random erasing 0.25.
    "voc": CamTrainConfig(),
    # COCO differs only in its base learning rate.
    "coco": CamTrainConfig(base_lr=2e-4),
}

DUMP_RECIPES: dict[str, CamSettings] = {
    "shapes": CamSettings(scales=(1.0, 1.5), flip=True, variant="cross", power=0.5),
    # The reference's dumps: the fine CAM at 1.0 and 1.2 (VOC), 1.0, 0.8 and 1.2 (COCO), + flip.
    "voc": CamSettings(scales=(1.0, 1.2), flip=True, variant="fine"),
    "coco": CamSettings(scales=(1.0, 0.8, 1.2), flip=True, variant="fine"),
}


def recipe_names() -> list[str]:
    """Datasets with a recipe, in table order."""
    return list(CAM_RECIPES)


def _lookup(table: dict, name: str, what: str):  # type: ignore[no-untyped-def]
    try:
        return table[name]
    except KeyError:
        raise WeakTrError(
            f"no {what} recipe for {name!r}", hint=f"choose one of: {', '.join(table)}"
        ) from None


def cam_recipe(name: str) -> CamTrainConfig:
    """The CAM training recipe for dataset `name` (a fresh copy; edits do not leak)."""
    import dataclasses

    return dataclasses.replace(_lookup(CAM_RECIPES, name, "CAM training"))


def dump_recipe(name: str) -> CamSettings:
    """The CAM dump settings for dataset `name` (`CamSettings` is frozen)."""
    return _lookup(DUMP_RECIPES, name, "CAM dump")


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
#: weights are given (`weaktr retrain --pretrained cam.ckpt`): the built-in dataset has no
#: pretrained ViT, and a tiny segmenter from scratch learns too slowly on 2 cores.
RETRAIN_FROM_CAM: frozenset[str] = frozenset({"shapes", "smoke"})

#: Test-time settings; `predict` fills window, stride and normalisation from the checkpoint.
PREDICT_RECIPES: dict[str, PredictSettings] = {
    "voc": PredictSettings(),
    "coco": PredictSettings(),
    "shapes": PredictSettings(),
    "smoke": PredictSettings(flip=False),
}

CAM_RECIPES["smoke"] = CamTrainConfig(
    arch="micro", epochs=1, batch_size=8, base_lr=4e-3, warmup_epochs=0.0, input_size=32,
    crop_scale=(0.5, 1.0), randaugment=False, random_erasing=0.0, drop_path=0.0,
    precision="fp32", seed=0)
DUMP_RECIPES["smoke"] = CamSettings(scales=(1.0,), flip=True, variant="cross", power=0.5)
