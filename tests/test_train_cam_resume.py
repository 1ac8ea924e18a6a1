"""train-cam --resume: an interrupted run continues exactly; a run with other settings or
another dataset is refused in one line (docs/RELIABILITY.md 14.9)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import run_cli
from weaktr_cli.checkpoints import load_checkpoint
from weaktr_cli.data.shapes import ShapesConfig, ensure_shapes, open_shapes
from weaktr_cli.recipes import CAM_RECIPES
from weaktr_cli.train_cam import train_cam
from weaktr_cli.training import TrainingOptions


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = ShapesConfig(num_train=24, num_val=8, image_size=32, seed=3)
    return ensure_shapes(config, cache_dir=tmp_path_factory.mktemp("shapes"))


def _timeless(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in history]


def test_interrupted_run_resumes_to_the_same_weights(shapes_root: Path, tmp_path: Path,
                                                     one_torch_thread: None) -> None:
    train_set = open_shapes("train", shapes_root)
    config = dataclasses.replace(CAM_RECIPES["smoke"], epochs=2, seed=5)  # 3 steps an epoch
    whole = train_cam(train_set, None, tmp_path / "whole.ckpt", config,
                      options=TrainingOptions("cpu"))
    whole_weights, whole_meta = load_checkpoint(tmp_path / "whole.ckpt", kind="cam")
    # A run interrupted in epoch 2 (as by Ctrl-C): its last resume point is the end of epoch 1.
    cut = tmp_path / "cut.ckpt"

    def interrupt_at_step_4(step: int, _total: int) -> None:
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_cam(train_set, None, cut, config,
                  options=TrainingOptions("cpu", progress=interrupt_at_step_4))
    assert not cut.exists()
    assert torch.load(cut.with_name("cut.ckpt.state"), weights_only=True)["epoch"] == 1
    resumed = train_cam(train_set, None, cut, config, options=TrainingOptions("cpu", resume=True))
    assert resumed.steps == 6 and [r["epoch"] for r in resumed.history] == [1, 2]
    weights, meta = load_checkpoint(cut, kind="cam")
    assert weights.keys() == whole_weights.keys()
    for key, value in whole_weights.items():
        assert torch.equal(weights[key], value), key
    assert meta["history"] == whole_meta["history"]
    assert _timeless(resumed.history) == _timeless(whole.history)


def _cli_run(capsys, root: Path, out: Path, *extra: object):
    return run_cli(capsys, "train-cam", "--data-root", root, "--recipe", "smoke",
                   "--val-split", "none", "--out", out, "-q", *extra)


def test_resume_refuses_other_settings_and_datasets(capsys, shapes_root: Path, tmp_path: Path,
                                                    one_torch_thread: None) -> None:
    out = tmp_path / "cam.ckpt"
    assert _cli_run(capsys, shapes_root, out, "--epochs", "1").code == 0
    before = out.read_bytes()

    # another epoch count: the schedule would differ, so the run cannot continue exactly
    result = _cli_run(capsys, shapes_root, out, "--epochs", "3", "--resume")
    assert result.code == 1
    assert "other settings (epochs)" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2  # the error and its hint

    # another dataset (3 classes, other images): one line, not torch's size-mismatch text
    other = ensure_shapes(ShapesConfig(num_train=16, num_val=4, image_size=32, num_classes=3,
                                       seed=4), cache_dir=tmp_path / "other")
    result = _cli_run(capsys, other, out, "--epochs", "1", "--resume")
    assert result.code == 1
    assert "other settings (class_names, num_images)" in result.stderr
    assert "size mismatch" not in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2
    assert out.read_bytes() == before  # nothing was overwritten

    # the same settings: accepted (the run is complete, so nothing more to train)
    assert _cli_run(capsys, shapes_root, out, "--epochs", "1", "--resume").code == 0
    assert out.read_bytes() == before
