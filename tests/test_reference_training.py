"""The reference's training options run end to end on tiny data: CAM training with timm's
augmentation, every parameter decayed, the cosine stepped per epoch and the global batch;
retraining with the reference's Segmenter (eps 1e-5, bilinear) and its normalisation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests._tiny_data import TinyDataset, write_tiny_cams
from weaktr_cli.errors import WeakTrError
from weaktr_cli.models.io import load_segmenter
from weaktr_cli.models.segmenter import BilinearPosEmbedViT
from weaktr_cli.recipes import resolve
from weaktr_cli.settings import CamTrainConfig
from weaktr_cli.train_cam import train_cam
from weaktr_cli.training import TrainingOptions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cam_training_with_the_reference_options(tmp_path) -> None:
    train = TinyDataset(n=8, seed=0)
    config = CamTrainConfig(arch="micro", epochs=3, batch_size=4, base_lr=4e-3, input_size=32,
                            warmup_epochs=1, warmup_lr=1e-6, min_lr=1e-5, drop_path=0.0,
                            fusion="aaf-rand", aaf_reduction=1.5, augment="timm",
                            decay_policy="all", schedule_unit="epoch", global_batch=True,
                            precision="amp-fp16", seed=0)
    config.check()
    result = train_cam(train, None, tmp_path / "cam.ckpt", config, options=TrainingOptions("cpu"))
    lrs = [record["lr"] for record in result.history]
    peak = 4e-3 * 4 / 512
    # Stepped after each epoch: epoch 1 at the warm-up start, epoch 2 at lr(0) (still the
    # start: warm-up t=0), epoch 3 at lr(1) = the peak (cosine from t = 1 of 3).
    assert lrs[0] == pytest.approx(1e-6) and lrs[1] == pytest.approx(1e-6)
    import math

    assert lrs[2] == pytest.approx(1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi / 3)))
    assert result.steps == 3 * (8 // 4)


def test_retraining_with_the_reference_segmenter(tmp_path) -> None:
    train = TinyDataset(n=8, seed=1)
    cams = write_tiny_cams(tmp_path / "cams.h5", train)
    from weaktr_cli.retrain import SeedSource, retrain

    config = dataclasses.replace(
        resolve("retrain", "voc-release"), arch="micro", crop_size=32, batch_size=4,
        iterations=2, max_steps=2, clip_patch=8, log_every=1)
    assert (config.norm_eps, config.pos_embed_interp, config.global_batch) == (1e-5, "bilinear",
                                                                               True)
    retrain(train, SeedSource(cams, bg=0.4), tmp_path / "seg.ckpt", config,
            options=TrainingOptions("cpu"))
    model, meta = load_segmenter(tmp_path / "seg.ckpt")
    assert isinstance(model.encoder, BilinearPosEmbedViT)
    assert model.encoder.norm.eps == 1e-5 and model.encoder.blocks[0].norm1.eps == 1e-5
    assert meta["model"]["normalization"] == "imagenet-rounded"
    assert meta["train"]["precision"] == "fp32"
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 48)).shape == (1, train.num_classes, 40, 48)


@pytest.mark.parametrize(("batch", "world", "expected"), [(64, 1, 64), (64, 2, 32), (4, 4, 1)])
def test_global_batch_is_split_over_the_processes(batch: int, world: int, expected: int) -> None:
    """The reference's batch is global (OnlineRetraining/segm/train.py:160): under torchrun
    each process takes batch // world, so the effective batch does not grow with the world."""
    from weaktr_cli.training import per_process_batch

    assert per_process_batch(batch, True, world) == expected
    assert per_process_batch(batch, False, world) == batch  # weaktr's own: per process


def test_global_batch_smaller_than_the_world_is_one_line() -> None:
    from weaktr_cli.training import per_process_batch

    with pytest.raises(WeakTrError, match="does not split over 8 processes"):
        per_process_batch(4, True, 8)
