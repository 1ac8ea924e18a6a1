"""Recipes: every recipe builds, the paper's values are the paper's, the shapes recipe fits the
built-in dataset, and the CAM `power` knob of the shapes dump is monotone and exact."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from weaktr_cli.cams import CamSettings, infer_cams
from weaktr_cli.data.shapes import ShapesConfig
from weaktr_cli.errors import WeakTrError
from weaktr_cli.models.cam_vit import CAM_VARIANTS, WeakTrCAM
from weaktr_cli.models.registry import ArchSpec, get_arch
from weaktr_cli.recipes import (
    CAM_RECIPES,
    DUMP_RECIPES,
    cam_recipe,
    dump_recipe,
    recipe_names,
)
from weaktr_cli.train_cam import SELECTIONS, build_cam_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # restored after each test


def _spec(arch: str | ArchSpec) -> ArchSpec:
    return arch if isinstance(arch, ArchSpec) else get_arch(arch)


def test_every_dataset_has_both_recipes() -> None:
    assert recipe_names()[:3] == ["shapes", "voc", "coco"]
    assert set(DUMP_RECIPES) == set(CAM_RECIPES)


@pytest.mark.parametrize("name", list(CAM_RECIPES))
def test_recipes_are_valid(name: str) -> None:
    config = cam_recipe(name)
    spec = _spec(config.arch)
    # no recipe needs pixel labels to pick its checkpoint
    assert config.select in SELECTIONS and config.select != "cam-miou"
    assert config.epochs > 0 and config.batch_size > 0 and config.base_lr > 0
    assert 0 <= config.warmup_epochs < config.epochs
    assert 0 < config.crop_scale[0] <= config.crop_scale[1] <= 1
    assert config.input_size % spec.patch_size == 0
    assert config.to_dict()["epochs"] == config.epochs  # JSON-able for the checkpoint
    settings = dump_recipe(name)
    settings.check()
    assert settings.scales[0] == 1.0


def test_paper_recipes() -> None:
    # voc / coco are the reference's release recipes (0ff9d9a); "-paper" its paper's (3547b87);
    # every value against the reference: tests/test_reference_recipes.py, docs/REPRODUCING.md.
    voc, coco = cam_recipe("voc"), cam_recipe("coco")
    assert voc == cam_recipe("voc-release") and coco == cam_recipe("coco-release")
    assert (voc.arch, voc.fusion, voc.epochs, voc.batch_size, voc.input_size) == (
        "deit-small", "aaf-feat", 60, 64, 224,
    )  # fmt: skip
    assert (voc.base_lr, voc.weight_decay, voc.warmup_epochs, voc.min_lr) == (
        6e-4, 0.03, 5.0, 1e-5,
    )  # fmt: skip
    assert voc.crop_scale == (0.08, 1.0) and voc.augment == "timm" and voc.random_erasing == 0.25
    assert coco.base_lr == 2e-4
    assert dataclasses.replace(coco, base_lr=voc.base_lr) == voc  # COCO differs only in lr
    paper = cam_recipe("voc-paper")
    assert (paper.fusion, paper.base_lr, paper.weight_decay) == ("aaf", 4e-4, 0.05)
    assert DUMP_RECIPES["voc"] == CamSettings(scales=(1.0, 1.2), flip=True, variant="fine",
                                              minmax_eps=1e-8, precision="amp-fp16")
    assert DUMP_RECIPES["coco"].scales == (1.0, 0.8, 1.2)
    assert DUMP_RECIPES["voc-paper"].scales == (1.0, 0.8, 1.2)


def test_recipe_names_resolve_per_dataset() -> None:
    from weaktr_cli.recipes import qualify_recipe, recipe_help

    assert qualify_recipe(None, "voc") == "voc" and qualify_recipe(None, "shapes") == "shapes"
    assert qualify_recipe("paper", "coco") == "coco-paper"
    assert qualify_recipe("release", "voc") == "voc-release"
    assert qualify_recipe("paper", "mydata") == "voc-paper"
    assert qualify_recipe("shapes", "voc") == "shapes"
    text = recipe_help()
    for name in CAM_RECIPES:
        if name != "smoke":  # registered by the tests
            assert name in text
    assert "release" in text and "paper" in text


def test_shapes_recipe_fits_the_builtin_dataset() -> None:
    config, settings = cam_recipe("shapes"), dump_recipe("shapes")
    spec = _spec(config.arch)
    size = ShapesConfig().image_size
    # trained at the dataset's own size, on the positional embedding's own grid
    assert config.input_size == spec.img_size == size
    assert size % spec.patch_size == 0 and size // spec.patch_size >= 8
    # the fine CAM fails from scratch (docs/method.md, measured): the shapes dump must not use it
    assert settings.variant in CAM_VARIANTS and settings.variant != "fine"
    assert all(round(size * s) >= spec.patch_size for s in settings.scales)
    model = build_cam_model(config, ShapesConfig().num_classes).eval()
    grid = size // spec.patch_size
    with torch.inference_mode():
        out = model(torch.randn(2, 3, size, size), with_maps=True)
    assert out.cross_cam is not None and out.cross_cam.shape == (2, 6, grid, grid)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000  # CPU-sized


def test_recipes_are_copies() -> None:
    config = cam_recipe("shapes")
    config.epochs = 999
    assert CAM_RECIPES["shapes"].epochs != 999 and cam_recipe("shapes").epochs != 999


def test_unknown_recipe_lists_the_known_ones() -> None:
    with pytest.raises(WeakTrError) as err:
        cam_recipe("cityscapes")
    assert "cityscapes" in str(err.value) and "shapes, voc, coco" in (err.value.hint or "")
    with pytest.raises(WeakTrError):
        dump_recipe("cityscapes")


def test_power_is_applied_after_normalisation() -> None:
    torch.manual_seed(0)
    model = WeakTrCAM("micro", 3, aaf_reduction=2).eval()
    images = torch.randint(0, 256, (2, 3, 32, 40), dtype=torch.uint8)
    labels = [np.array([1, 3]), np.array([2])]
    cpu = torch.device("cpu")
    plain = infer_cams(model, images, labels, CamSettings(variant="cross"), cpu, "fp32")
    root = infer_cams(model, images, labels, CamSettings(variant="cross", power=0.5), cpu,
                      "fp32")
    for a, b in zip(plain, root, strict=True):
        assert a.shape == b.shape and b.min() >= 0 and b.max() <= 1
        # sqrt is monotone: the labels at threshold t equal those at sqrt(t) without power
        np.testing.assert_allclose(b, np.sqrt(a), atol=1e-6)


@pytest.mark.parametrize("power", [0.0, -1.0, float("nan")])
def test_invalid_power_is_rejected(power: float) -> None:
    with pytest.raises(WeakTrError, match="power"):
        CamSettings(power=power).check()


def test_shapes_retraining_runs_fp32_on_every_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # The result must not depend on the CPU kind: even where bf16 is native, the shapes
    # retraining recipe resolves to fp32 on the CPU (its click step was measured in fp32).
    from weaktr_cli import recipes, runtime

    monkeypatch.setattr(runtime, "cpu_bf16_is_fast", lambda: True)
    monkeypatch.setattr(recipes, "_BUILT", {})
    config = recipes._table("retrain")["shapes"]
    assert runtime.resolve_precision(config.precision, torch.device("cpu"), training=True) == "fp32"
    assert config.arch == "tiny-c8-stem" and get_arch(config.arch).depth == 0
