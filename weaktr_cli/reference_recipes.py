"""The reference's two versions as weaktr recipes: `paper` (hustvl/WeakTr 3547b87) and `release`
(0ff9d9a, whose checkpoints users download), for VOC and COCO, every phase.

Each entry is the set of settings that differ from the settings classes' defaults; every value is
the reference's, cited in docs/REPRODUCING.md (one row per setting, with file and line). Plain
data: `weaktr_cli.recipes` builds the named recipes (`voc-paper`, `voc-release`, `coco-paper`,
`coco-release`) from it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MULTISCALE_RATIOS", "REFERENCE_VERSIONS", "SEARCH_START", "reference_overrides"]

#: recipe version -> reference commit
REFERENCE_VERSIONS = {"paper": "3547b87", "release": "0ff9d9a"}

_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

# Shared by both versions and both datasets: timm's augmentation factory, fp16 autocast on
# CUDA, the global batch split over the processes, the cosine stepped once per epoch.
_CAM_COMMON: dict[str, Any] = {
    "arch": "deit-small", "epochs": 60, "batch_size": 64, "global_batch": True,
    "warmup_epochs": 5.0, "warmup_lr": 1e-6, "min_lr": 1e-5, "input_size": 224,
    "crop_scale": (0.08, 1.0), "random_erasing": 0.25, "drop_path": 0.1,
    "augment": "timm", "schedule_unit": "epoch", "precision": "amp-fp16", "seed": 504,
}
_CAM_VERSION: dict[str, dict[str, Any]] = {
    # 3547b87: AAF on average-pooled maps, r 4; model passed to timm's optimiser factory.
    "paper": {"fusion": "aaf", "aaf_pool": "avg", "aaf_reduction": 4.0, "weight_decay": 0.05,
              "decay_policy": "exempt-1d-tokens"},
    # 0ff9d9a: AAF on attention features, max pooling, r 8; every parameter decayed.
    "release": {"fusion": "aaf-feat", "aaf_pool": "max", "aaf_reduction": 8.0,
                "weight_decay": 0.03, "decay_policy": "all"},
}
#: base learning rate per 512 images
_CAM_LR = {("voc", "paper"): 4e-4, ("voc", "release"): 6e-4,
           ("coco", "paper"): 2e-4, ("coco", "release"): 2e-4}
_DUMP_SCALES = {("voc", "paper"): (1.0, 0.8, 1.2), ("voc", "release"): (1.0, 1.2),
                ("coco", "paper"): (1.0, 0.8, 1.2), ("coco", "release"): (1.0, 0.8, 1.2)}
_SEED_BG = {("voc", "paper"): 0.42, ("voc", "release"): 0.43,
            ("coco", "paper"): 0.42, ("coco", "release"): 0.42}
#: where the reference's CAM threshold search starts (main.py:166 / :177)
SEARCH_START = {"paper": 0.30, "release": 0.40}


def reference_overrides(phase: str, dataset: str, version: str) -> dict[str, Any]:
    """The settings of `phase` ("cam", "dump", "seeds", "retrain", "predict") that recipe
    `<dataset>-<version>` sets; dataset "voc" or "coco", version "paper" or "release"."""
    key = (dataset, version)
    if phase == "cam":
        return {**_CAM_COMMON, **_CAM_VERSION[version], "base_lr": _CAM_LR[key]}
    if phase == "dump":
        return {"scales": _DUMP_SCALES[key], "flip": True, "variant": "fine", "power": 1.0,
                "minmax_eps": 1e-8, "precision": "amp-fp16"}
    if phase == "seeds":
        return {"bg": _SEED_BG[key], "preset": dataset}
    if phase == "retrain":
        # Segmenter as the reference's (LayerNorm eps 1e-5, bilinear position embedding),
        # its rounded normalisation, batch 4 over all processes, fp32 (OnlineRetraining).
        return {"arch": "deit-small", "crop_size": 480, "batch_size": 4, "global_batch": True,
                "epochs": 100, "lr": 1e-4, "min_lr": 1e-5, "encoder_lr_mult": 0.1,
                "optimizer": "sgd", "weight_decay": 0.0, "clip": True, "tau": 1.2,
                "clip_patch": 120, "drop_path": 0.1, "decoder": "mask", "decoder_layers": 2,
                "decoder_dropout": 0.1, "norm_eps": 1e-5, "pos_embed_interp": "bilinear",
                "normalization": "reference", "precision": "fp32"}
    if phase == "predict":
        # Single scale without flip by default; --multiscale adds `multiscale_scales` + flips.
        return {"window": 480, "stride": 320, "scales": (1.0,), "base_size": 520,
                "flip": False, "layer_weights": (0.8, 1.0), "precision": "fp32",
                "crf": f"{dataset}-test", "procedure": "reference"}
    raise KeyError(phase)


#: The multi-scale ratios `--multiscale` uses with a reference recipe.
MULTISCALE_RATIOS = _RATIOS
