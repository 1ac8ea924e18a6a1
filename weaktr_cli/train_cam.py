"""Phase 1: train the WeakTr CAM model from image-level labels.

`train_cam(train_set, val_set, out, config)` runs AdamW with warm-up and cosine decay (timm's
factories), the augmentations of docs/method.md, gradient accumulation and mixed precision on
CUDA, on the shared skeleton of `weaktr_cli.training`: a self-describing checkpoint,
`<out>.last` / `<out>.state` after every epoch for an exact `resume=True`, unchanged under
torchrun (DDP, gloo on CPU).

Checkpoint selection never needs pixel labels by default: `select="last"` or `"val-map"`
(image-level mAP on the validation split). `"cam-miou"` is an explicit opt-in that scores CAMs
against pixel ground truth, as the reference does.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from weaktr_cli.data.base import SegmentationDataset
from weaktr_cli.data.loader import LabelledImages, cam_train_transform, normalize, to_tensor
from weaktr_cli.errors import WeakTrError
from weaktr_cli.models.cam_vit import WeakTrCAM, cam_loss
from weaktr_cli.models.io import load_cam_model
from weaktr_cli.runtime import autocast
from weaktr_cli.settings import SELECTIONS, CamSettings, CamTrainConfig
from weaktr_cli.training import TrainingOptions, TrainingRun, per_process_batch, training_run

__all__ = [
    "SELECTIONS",
    "CamTrainConfig",
    "CamTrainResult",
    "average_precision",
    "build_cam_model",
    "cam_miou_scorer",
    "load_cam_model",
    "train_cam",
    "validation_map",
]

#: Settings a resumed run may change: where it stops and how data is loaded.
_FREE_ON_RESUME = ("max_steps", "workers", "cache_images")


@dataclass
class CamTrainResult:
    checkpoint: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    selected_epoch: int = 0
    #: the model as trained in this process (every rank has one under torchrun)
    model: WeakTrCAM | None = None
    steps: int = 0  #: optimizer steps taken, counted on every rank


def build_cam_model(config: CamTrainConfig, num_classes: int) -> WeakTrCAM:
    return WeakTrCAM(config.arch, num_classes, fusion=config.fusion, aaf_pool=config.aaf_pool,
                     aaf_reduction=config.aaf_reduction, drop_path_rate=config.drop_path)


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over classes (with at least one positive) of the area under precision-recall."""
    aps = []
    for c in range(targets.shape[1]):
        positives = targets[:, c] > 0
        if not positives.any():
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        hits = positives[order]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(float(precision[hits].mean()))
    return float(np.mean(aps)) if aps else float("nan")


@torch.inference_mode()
def validation_map(model: WeakTrCAM, dataset: SegmentationDataset, device: torch.device,
                   size: int, precision: str, batch_size: int = 64) -> float:
    """Image-level mAP of the mean class probability of the three heads (no pixel labels)."""
    from torch.nn import functional as F

    model.eval()
    scores, targets = [], []
    for start in range(0, len(dataset), batch_size):
        ids = dataset.ids[start : start + batch_size]
        batch = torch.stack([
            F.interpolate(to_tensor(dataset.load_image(i))[None].float(), size=(size, size),
                          mode="bilinear", align_corners=False)[0]
            for i in ids
        ])
        with autocast(device, precision):
            out = model(normalize(batch.clamp(0, 255)).to(device))
        probs = (out.token_logits.sigmoid() + out.coarse_logits.sigmoid()
                 + out.fine_logits.sigmoid()) / 3
        scores.append(probs.float().cpu().numpy())
        targets.append(np.stack([dataset.label_vector(i) for i in ids]))
    return average_precision(np.concatenate(scores), np.concatenate(targets))


def cam_miou_scorer(val_set: SegmentationDataset, settings: CamSettings
                    ) -> Callable[[WeakTrCAM], float]:
    """CAM mIoU (best background threshold) of a model on `val_set`'s pixel ground truth,
    for the opt-in `select="cam-miou"`; the CAMs are dumped with `settings`."""
    import tempfile

    from weaktr_cli.artifacts import open_artifact
    from weaktr_cli.cams import dump_cams
    from weaktr_cli.evaluation import evaluate_artifact
    from weaktr_cli.metrics import default_thresholds
    from weaktr_cli.per_image import PerImageRun

    def score(model: WeakTrCAM) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            run = PerImageRun(val_set, Path(tmp) / "cams.h5", resume=False)
            path = dump_cams(model, run, settings=settings)
            with open_artifact(path) as reader:
                result = evaluate_artifact(reader, val_set, thresholds=default_thresholds())
        model.train()
        return result.scores.miou

    return score


def train_cam(
    train_set: SegmentationDataset,
    val_set: SegmentationDataset | None,
    out: str | Path,
    config: CamTrainConfig,
    *,
    pretrained: str | Path | None = None,
    options: TrainingOptions = TrainingOptions(),
    cam_miou_fn: Callable[[WeakTrCAM], float] | None = None,
) -> CamTrainResult:
    """Train a CAM model and write the selected checkpoint to `out` (safetensors).

    Also writes `<out>.last` (the newest epoch) and `<out>.state` (optimizer, scheduler, RNG,
    the run's settings) after every epoch, so `options.resume` continues an interrupted run
    exactly, and refuses one of another dataset or with other settings. `options`: device,
    resume and where the log lines, one JSONL record per epoch and the progress go.
    """
    out = Path(out)
    config.check()
    if config.select == "val-map" and val_set is None:
        raise WeakTrError("--select val-map needs a validation split", hint="pass --val-split")
    if config.select == "cam-miou" and cam_miou_fn is None:
        raise WeakTrError("--select cam-miou needs pixel ground truth to score CAMs")
    if len(train_set) == 0:
        raise WeakTrError(f"training split {train_set.split!r} is empty")
    settings = {k: v for k, v in config.to_dict().items() if k not in _FREE_ON_RESUME}
    settings.update(dataset=train_set.name, train_split=train_set.split,
                    class_names=list(train_set.class_names), num_images=len(train_set),
                    val_split=val_set.split if val_set is not None else None)
    with training_run(out, options, seed=config.seed, precision=config.precision,
                      settings=settings) as run:
        model = build_cam_model(config, train_set.num_classes - 1)
        if pretrained is not None:
            from weaktr_cli.models.weights import load_pretrained_backbone

            report = load_pretrained_backbone(model, pretrained)
            run.say(f"loaded ImageNet weights from {pretrained}: {report.summary()}")
        model.to(run.device)
        trainer = _CamTrainer(run, model, config, train_set)
        if options.resume:
            trainer.resume()
            run.say(f"resumed from epoch {trainer.start_epoch}")
        trainer.meta_base = {
            "kind": "cam",
            "model": model.config(),
            "class_names": list(train_set.class_names),
            "dataset": train_set.name,
            "train_split": train_set.split,
            "train": config.to_dict(),
            "lr": trainer.lr,
            "world_size": run.world,
            "pretrained": str(pretrained) if pretrained else None,
        }
        run.say(f"training {config.arch} ({config.fusion}) on {len(trainer.images)} images, "
                f"{config.epochs} epochs x {trainer.steps_per_epoch} steps, "
                f"lr {trainer.lr:.2e}, {run.precision}, {run.device}, world {run.world}")
        trainer.train(val_set, cam_miou_fn)
        best = out.with_name(out.name + ".best")
        if run.is_main and best.exists():  # absent when a finished run is resumed
            best.replace(out)
    return CamTrainResult(checkpoint=out, history=trainer.history,
                          selected_epoch=trainer.best[1], model=model, steps=trainer.step)


class _CamTrainer:
    """Data, optimizer, schedule and the epoch loop of one CAM training run."""

    def __init__(self, run: TrainingRun, model: WeakTrCAM, config: CamTrainConfig,
                 train_set: SegmentationDataset) -> None:
        from weaktr_cli.cam_training_options import (
            build_cam_optimizer,
            build_cam_scheduler,
            timm_cam_transform,
        )

        self.run, self.model, self.config = run, model, config
        transform = (timm_cam_transform(config.input_size, crop_scale=config.crop_scale,
                                        re_prob=config.random_erasing)
                     if config.augment == "timm" else
                     cam_train_transform(config.input_size, crop_scale=config.crop_scale,
                                         randaugment=config.randaugment,
                                         random_erasing=config.random_erasing))
        self.images = LabelledImages(train_set, transform, cache=config.cache_images)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.sampler = self._sampler()
        # With `global_batch` the batch is the reference's: global, split over the processes.
        batch = per_process_batch(config.batch_size, config.global_batch, run.world)
        self.loader = DataLoader(self.images, batch_size=batch, sampler=self.sampler,
                                 num_workers=config.workers, drop_last=True,
                                 persistent_workers=config.workers > 0, generator=self.generator)
        self.steps_per_epoch = len(self.loader) // config.accum_steps
        if self.steps_per_epoch == 0:
            raise WeakTrError(
                f"{len(self.images)} training images give no full batch of {config.batch_size}",
                hint="lower --batch-size",
            )
        effective_batch = batch * config.accum_steps * run.world
        self.lr = config.base_lr * effective_batch / 512
        self.optimizer = build_cam_optimizer(model, lr=self.lr, weight_decay=config.weight_decay,
                                             policy=config.decay_policy)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.scheduler = build_cam_scheduler(
            self.optimizer, epochs=config.epochs, steps_per_epoch=self.steps_per_epoch,
            warmup_epochs=config.warmup_epochs, warmup_lr=config.warmup_lr,
            min_lr=config.min_lr, unit=config.schedule_unit)
        self.scaler = torch.amp.GradScaler(enabled=run.precision == "fp16")
        self.train_model = run.wrap(model)
        self.start_epoch, self.step = 0, 0
        self.history: list[dict[str, Any]] = []
        self.best = (-math.inf, 0)
        self.meta_base: dict[str, Any] = {}

    def _sampler(self) -> Any:
        run = self.run
        if run.dist.enabled:
            from torch.utils.data.distributed import DistributedSampler

            return DistributedSampler(self.images, num_replicas=run.world, rank=run.dist.rank,
                                      shuffle=True, seed=self.config.seed, drop_last=True)
        return torch.utils.data.RandomSampler(self.images, generator=self.generator)

    def resume(self) -> None:
        state = self.run.resume(self.model, "cam")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = json.loads(state["history"])
        self.best = (float(state["best_score"]), int(state["best_epoch"]))
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["generator_rng"])

    def train(self, val_set: SegmentationDataset | None,
              cam_miou_fn: Callable[[WeakTrCAM], float] | None) -> None:
        for epoch in range(self.start_epoch, self.config.epochs):
            if self.run.dist.enabled:
                self.sampler.set_epoch(epoch)
            record, stop = self._epoch(epoch)
            if self.run.is_main:
                score = self._validate(record, epoch, val_set, cam_miou_fn)
                self.history.append(record)
                self.run.say(_format_record(record))
                self.run.log_record(record)
                self._save(epoch, score)
            if stop:
                break

    def _epoch(self, epoch: int) -> tuple[dict[str, Any], bool]:
        """One epoch (or up to `max_steps`): its log record and whether to stop."""
        config, run, optimizer = self.config, self.run, self.optimizer
        self.train_model.train()
        started = time.perf_counter()
        sums = {"loss": 0.0, "token": 0.0, "coarse": 0.0, "fine": 0.0}
        seen, stop = 0, False
        optimizer.zero_grad(set_to_none=True)
        for micro, (batch, targets) in enumerate(self.loader):
            batch, targets = batch.to(run.device, non_blocking=True), targets.to(run.device)
            with autocast(run.device, run.precision):
                outputs = self.train_model(batch)
            loss, parts = cam_loss(outputs, targets.float())
            if not torch.isfinite(loss):
                raise WeakTrError(
                    f"training diverged: loss is {loss.item()} at epoch {epoch + 1}",
                    hint="lower --lr or use --precision fp32",
                )
            self.scaler.scale(loss / config.accum_steps).backward()
            sums["loss"] += loss.item() * len(batch)
            for key, value in parts.items():
                sums[key] += value.item() * len(batch)
            seen += len(batch)
            if (micro + 1) % config.accum_steps:
                continue
            self.scaler.step(optimizer)
            self.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if config.schedule_unit == "step":
                self.scheduler.step_update(self.step)
            run.report_progress(self.step, self.total_steps)
            if config.max_steps is not None and self.step >= config.max_steps:
                stop = True
                break
        lr = optimizer.param_groups[0]["lr"]
        if config.schedule_unit == "epoch":
            self.scheduler.step(epoch)  # after the epoch, as the reference (main.py:380)
        record: dict[str, Any] = {
            "epoch": epoch + 1, "step": self.step,
            **{k: v / max(seen, 1) for k, v in sums.items()},
            "lr": lr,
            "images_per_s": seen * run.world / (time.perf_counter() - started),
        }
        return record, stop

    def _validate(self, record: dict[str, Any], epoch: int,
                  val_set: SegmentationDataset | None,
                  cam_miou_fn: Callable[[WeakTrCAM], float] | None) -> float:
        """Add the validation figures to `record`; returns the selection score."""
        config = self.config
        score = float(epoch)  # "last": the newest epoch wins
        if val_set is not None and len(val_set):
            record["val_map"] = validation_map(self.model, val_set, self.run.device,
                                               config.input_size, self.run.precision)
            if config.select == "val-map":
                score = record["val_map"]
        if config.select == "cam-miou" and cam_miou_fn is not None:
            record["cam_miou"] = cam_miou_fn(self.model)
            score = record["cam_miou"]
        return score

    def _save(self, epoch: int, score: float) -> None:
        from weaktr_cli.checkpoints import save_checkpoint

        out = self.run.out
        # Timings stay out of the checkpoint so seeded runs give identical files.
        timeless = [{k: v for k, v in r.items() if k != "images_per_s"} for r in self.history]
        meta = {**self.meta_base, "epoch": epoch + 1, "step": self.step, "history": timeless}
        self.run.save_last(self.model, meta)
        if score >= self.best[0]:
            self.best = (score, epoch + 1)
            save_checkpoint(out.with_name(out.name + ".best"), self.model.state_dict(),
                            {**meta, "selected_by": self.config.select})
        self.run.save_state({
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch + 1,
            "step": self.step,
            "history": json.dumps(self.history),
            "best_score": self.best[0],
            "best_epoch": self.best[1],
            "torch_rng": torch.get_rng_state(),
            "generator_rng": self.generator.get_state(),
        })


def _format_record(r: dict[str, Any]) -> str:
    text = (f"epoch {r['epoch']:3d}  loss {r['loss']:.4f} (token {r['token']:.3f} coarse "
            f"{r['coarse']:.3f} fine {r['fine']:.3f})  lr {r['lr']:.2e}  "
            f"{r['images_per_s']:.0f} img/s")
    if "val_map" in r:
        text += f"  val mAP {r['val_map'] * 100:.1f}"
    if "cam_miou" in r:
        text += f"  CAM mIoU {r['cam_miou'] * 100:.1f}"
    return text
