"""The `paper` (3547b87) and `release` (0ff9d9a) recipes hold the reference's values, phase by
phase, for VOC and COCO (expected values transcribed from the reference; docs/REPRODUCING.md)."""

from __future__ import annotations

import pytest

from weaktr_cli.reference_recipes import reference_overrides

DATASETS = ("voc", "coco")
VERSIONS = ("paper", "release")


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("version", VERSIONS)
def test_every_phase_is_the_references(dataset: str, version: str) -> None:
    cam = reference_overrides("cam", dataset, version)
    # main.py:33-35, :54, :92, :104-123; engine.py:30 (fp16 autocast); timm create_transform
    assert (cam["arch"], cam["epochs"], cam["batch_size"], cam["seed"]) == ("deit-small", 60,
                                                                            64, 504)
    assert cam["global_batch"] and cam["augment"] == "timm"
    assert cam["schedule_unit"] == "epoch" and cam["precision"] == "amp-fp16"
    assert (cam["warmup_epochs"], cam["warmup_lr"], cam["min_lr"]) == (5.0, 1e-6, 1e-5)
    assert (cam["random_erasing"], cam["drop_path"]) == (0.25, 0.1)
    dump = reference_overrides("dump", dataset, version)
    assert dump["minmax_eps"] == 1e-8 and dump["variant"] == "fine" and dump["flip"]
    seeds = reference_overrides("seeds", dataset, version)
    assert seeds["preset"] == dataset
    retrain = reference_overrides("retrain", dataset, version)
    assert (retrain["norm_eps"], retrain["pos_embed_interp"]) == (1e-5, "bilinear")
    assert (retrain["batch_size"], retrain["global_batch"], retrain["epochs"]) == (4, True, 100)
    assert (retrain["lr"], retrain["encoder_lr_mult"], retrain["optimizer"]) == (1e-4, 0.1, "sgd")
    assert (retrain["tau"], retrain["clip_patch"], retrain["precision"]) == (1.2, 120, "fp32")
    assert retrain["normalization"] == "reference"
    predict = reference_overrides("predict", dataset, version)
    assert predict["procedure"] == "reference" and predict["base_size"] == 520
    assert (predict["window"], predict["stride"], predict["layer_weights"]) == (480, 320,
                                                                                (0.8, 1.0))
    assert predict["crf"] == f"{dataset}-test" and predict["precision"] == "fp32"


def test_the_versions_differ_where_the_reference_does() -> None:
    paper, release = (reference_overrides("cam", "voc", v) for v in VERSIONS)
    # README.md:71 --lr 4e-4, main.py:72 wd 0.05, :58-59 avg / r 4, :343 create_optimizer(model)
    assert (paper["base_lr"], paper["weight_decay"]) == (4e-4, 0.05)
    assert (paper["fusion"], paper["aaf_pool"], paper["aaf_reduction"]) == ("aaf", "avg", 4.0)
    assert paper["decay_policy"] == "exempt-1d-tokens"
    # docs/Training.md:14-17 (r 8, max, lr 6e-4, wd 0.03), main.py:360 model.parameters()
    assert (release["base_lr"], release["weight_decay"]) == (6e-4, 0.03)
    assert (release["fusion"], release["aaf_pool"], release["aaf_reduction"]) == ("aaf-feat",
                                                                                 "max", 8.0)
    assert release["decay_policy"] == "all"
    assert reference_overrides("cam", "coco", "release")["base_lr"] == 2e-4  # Training.md:61
    # README.md:78 / docs/Training.md:24, :68
    assert reference_overrides("dump", "voc", "paper")["scales"] == (1.0, 0.8, 1.2)
    assert reference_overrides("dump", "voc", "release")["scales"] == (1.0, 1.2)
    assert reference_overrides("dump", "coco", "release")["scales"] == (1.0, 0.8, 1.2)
    # README.md:95 --t 42 / docs/Training.md:45 --t 43, :82 --t 42
    assert reference_overrides("seeds", "voc", "paper")["bg"] == 0.42
    assert reference_overrides("seeds", "voc", "release")["bg"] == 0.43
    assert reference_overrides("seeds", "coco", "release")["bg"] == 0.42
