"""Phase 1: train the WeakTr CAM model from image-level labels.

`train_cam(train_set, val_set, out, config)` runs AdamW with warm-up and cosine decay (timm's
factories), the augmentations of METHOD.md, gradient accumulation and mixed precision on CUDA,
and writes a self-describing checkpoint. It runs unchanged under torchrun (DDP, gloo on CPU).

Checkpoint selection never needs pixel labels by default: `select="last"` or `"val-map"`
(image-level mAP on the validation split). `"cam-miou"` is an explicit opt-in that scores CAMs
against pixel ground truth, as the reference does.
"""

from __future__ import annotations

import dataclasses
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

from weaktr_cli.checkpoints import (
    load_checkpoint,
    load_training_state,
    save_checkpoint,
    save_training_state,
)
from weaktr_cli.data.base import SegmentationDataset
from weaktr_cli.data.loader import LabelledImages, cam_train_transform, normalize, to_tensor
from weaktr_cli.errors import WeakTrError
from weaktr_cli.models.cam_vit import WeakTrCAM, cam_loss
from weaktr_cli.runtime import (
    autocast,
    configure_determinism,
    distributed,
    resolve_precision,
    seed_everything,
)

SELECTIONS = ("last", "val-map", "cam-miou")
Log = Callable[[str], None]


@dataclass
class CamTrainConfig:
    """Every setting of a CAM training run (recorded in the checkpoint).

    Defaults are the paper's VOC recipe (METHOD.md Phase 1); the built-in dataset's recipe
    lives in `recipes.py`.
    """

    arch: str = "deit-small"
    fusion: str = "aaf"
    aaf_pool: str | None = None  # None: the fusion's recipe (aaf avg, aaf-feat max)
    epochs: int = 60
    batch_size: int = 64
    base_lr: float = 6e-4  # per 512 images: lr = base_lr * batch_size * accum * world / 512
    weight_decay: float = 0.03
    warmup_epochs: float = 5.0
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    input_size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    randaugment: bool = True
    random_erasing: float = 0.25
    drop_path: float = 0.1
    accum_steps: int = 1
    precision: str = "auto"
    seed: int = 504
    select: str = "last"
    workers: int = 0
    cache_images: bool = False
    max_steps: int | None = None  # stop early (smoke tests); the schedule still spans all epochs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
                     drop_path_rate=config.drop_path)


def load_cam_model(path: str | Path) -> tuple[WeakTrCAM, dict[str, Any]]:
    """A trained CAM model (eval mode) and its checkpoint metadata."""
    from weaktr_cli.models.weights import strict_load

    state, meta = load_checkpoint(path, kind="cam")
    model = WeakTrCAM.from_config(meta["model"])
    strict_load(model, state, what=f"checkpoint {path}")
    return model.eval(), meta


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


def _state_paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".last"), out.with_name(out.name + ".state")


def train_cam(
    train_set: SegmentationDataset,
    val_set: SegmentationDataset | None,
    out: str | Path,
    config: CamTrainConfig,
    *,
    pretrained: str | Path | None = None,
    resume: bool = False,
    device: str = "auto",
    log: Log | None = None,
    log_jsonl: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    cam_miou_fn: Callable[[WeakTrCAM], float] | None = None,
) -> CamTrainResult:
    """Train a CAM model and write the selected checkpoint to `out` (safetensors).

    Also writes `<out>.last` (the newest epoch) and `<out>.state` (optimizer, scheduler, RNG)
    after every epoch, so `resume=True` continues an interrupted run exactly.
    """
    out = Path(out)
    say = log or (lambda _msg: None)
    if config.select not in SELECTIONS:
        raise WeakTrError(f"unknown selection {config.select!r}",
                          hint=f"choose one of {', '.join(SELECTIONS)}")
    if config.select == "val-map" and val_set is None:
        raise WeakTrError("--select val-map needs a validation split", hint="pass --val-split")
    if config.select == "cam-miou" and cam_miou_fn is None:
        raise WeakTrError("--select cam-miou needs pixel ground truth to score CAMs")
    if len(train_set) == 0:
        raise WeakTrError(f"training split {train_set.split!r} is empty")

    with distributed(device) as (dist_info, dev):
        seed_everything(config.seed, dist_info.rank)
        configure_determinism(True)
        precision = resolve_precision(config.precision, dev, training=True)
        model = build_cam_model(config, train_set.num_classes - 1)
        if pretrained is not None:
            from weaktr_cli.models.weights import load_pretrained_backbone

            load_pretrained_backbone(model, pretrained)
        model.to(dev)

        transform = cam_train_transform(config.input_size, crop_scale=config.crop_scale,
                                        randaugment=config.randaugment,
                                        random_erasing=config.random_erasing)
        images = LabelledImages(train_set, transform, cache=config.cache_images)
        generator = torch.Generator().manual_seed(config.seed)
        sampler: Any
        if dist_info.enabled:
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(images, num_replicas=dist_info.world_size,
                                         rank=dist_info.rank, shuffle=True, seed=config.seed,
                                         drop_last=True)
        else:
            sampler = torch.utils.data.RandomSampler(images, generator=generator)
        loader = DataLoader(images, batch_size=config.batch_size, sampler=sampler,
                            num_workers=config.workers, drop_last=True,
                            persistent_workers=config.workers > 0, generator=generator)
        steps_per_epoch = len(loader) // config.accum_steps
        if steps_per_epoch == 0:
            raise WeakTrError(
                f"{len(images)} training images give no full batch of {config.batch_size}",
                hint="lower --batch-size",
            )

        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler

        effective_batch = config.batch_size * config.accum_steps * dist_info.world_size
        lr = config.base_lr * effective_batch / 512
        optimizer = create_optimizer_v2(model, opt="adamw", lr=lr,
                                        weight_decay=config.weight_decay)
        total_steps = config.epochs * steps_per_epoch
        scheduler = CosineLRScheduler(
            optimizer, t_initial=total_steps, lr_min=config.min_lr,
            warmup_t=int(config.warmup_epochs * steps_per_epoch),
            warmup_lr_init=config.warmup_lr, t_in_epochs=False,
        )
        scaler = torch.amp.GradScaler(enabled=precision == "fp16")
        train_model: torch.nn.Module = model
        if dist_info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(
                model, device_ids=[dev.index] if dev.type == "cuda" else None
            )

        last_path, state_path = _state_paths(out)
        start_epoch, step, history = 0, 0, []
        best = (-math.inf, 0)
        if resume:
            state = load_training_state(state_path)
            weights, _ = load_checkpoint(last_path, kind="cam")
            model.load_state_dict(weights)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, step = int(state["epoch"]), int(state["step"])
            history = json.loads(state["history"])
            best = (float(state["best_score"]), int(state["best_epoch"]))
            torch.set_rng_state(state["torch_rng"])
            generator.set_state(state["generator_rng"])
            say(f"resumed from epoch {start_epoch}")

        meta_base = {
            "kind": "cam",
            "model": model.config(),
            "class_names": list(train_set.class_names),
            "dataset": train_set.name,
            "train_split": train_set.split,
            "train": config.to_dict(),
            "lr": lr,
            "world_size": dist_info.world_size,
            "pretrained": str(pretrained) if pretrained else None,
        }
        say(f"training {config.arch} ({config.fusion}) on {len(images)} images, "
            f"{config.epochs} epochs x {steps_per_epoch} steps, lr {lr:.2e}, {precision}, "
            f"{dev}, world {dist_info.world_size}")
        stop = False
        for epoch in range(start_epoch, config.epochs):
            if dist_info.enabled:
                sampler.set_epoch(epoch)
            train_model.train()
            started = time.perf_counter()
            sums = {"loss": 0.0, "token": 0.0, "coarse": 0.0, "fine": 0.0}
            seen = 0
            optimizer.zero_grad(set_to_none=True)
            for micro, (batch, targets) in enumerate(loader):
                batch, targets = batch.to(dev, non_blocking=True), targets.to(dev)
                with autocast(dev, precision):
                    outputs = train_model(batch)
                loss, parts = cam_loss(outputs, targets.float())
                if not torch.isfinite(loss):
                    raise WeakTrError(
                        f"training diverged: loss is {loss.item()} at epoch {epoch + 1}",
                        hint="lower --lr or use --precision fp32",
                    )
                scaler.scale(loss / config.accum_steps).backward()
                sums["loss"] += loss.item() * len(batch)
                for key, value in parts.items():
                    sums[key] += value.item() * len(batch)
                seen += len(batch)
                if (micro + 1) % config.accum_steps:
                    continue
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                scheduler.step_update(step)
                if progress and dist_info.is_main:
                    progress(step, total_steps)
                if config.max_steps is not None and step >= config.max_steps:
                    stop = True
                    break
            record: dict[str, Any] = {
                "epoch": epoch + 1, "step": step,
                **{k: v / max(seen, 1) for k, v in sums.items()},
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": seen * dist_info.world_size / (time.perf_counter() - started),
            }
            if dist_info.is_main:
                score = float(epoch)  # "last": the newest epoch wins
                if val_set is not None and len(val_set):
                    record["val_map"] = validation_map(model, val_set, dev, config.input_size,
                                                       precision)
                    if config.select == "val-map":
                        score = record["val_map"]
                if config.select == "cam-miou" and cam_miou_fn is not None:
                    record["cam_miou"] = cam_miou_fn(model)
                    score = record["cam_miou"]
                history.append(record)
                say(_format_record(record))
                if log_jsonl:
                    with open(log_jsonl, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
                # Timings stay out of the checkpoint so seeded runs give identical files.
                timeless = [{k: v for k, v in r.items() if k != "images_per_s"} for r in history]
                meta = {**meta_base, "epoch": epoch + 1, "step": step, "history": timeless}
                save_checkpoint(last_path, model.state_dict(), meta)
                if score >= best[0]:
                    best = (score, epoch + 1)
                    save_checkpoint(out.with_name(out.name + ".best"), model.state_dict(),
                                    {**meta, "selected_by": config.select})
                save_training_state(state_path, {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1,
                    "step": step,
                    "history": json.dumps(history),
                    "best_score": best[0],
                    "best_epoch": best[1],
                    "torch_rng": torch.get_rng_state(),
                    "generator_rng": generator.get_state(),
                })
            if stop:
                break

        if dist_info.is_main:
            best_path = out.with_name(out.name + ".best")
            best_path.replace(out)
        if dist_info.enabled:
            import torch.distributed as dist

            dist.barrier()
    return CamTrainResult(checkpoint=out, history=history, selected_epoch=best[1], model=model,
                          steps=step)


def _format_record(r: dict[str, Any]) -> str:
    text = (f"epoch {r['epoch']:3d}  loss {r['loss']:.4f} (token {r['token']:.3f} coarse "
            f"{r['coarse']:.3f} fine {r['fine']:.3f})  lr {r['lr']:.2e}  "
            f"{r['images_per_s']:.0f} img/s")
    if "val_map" in r:
        text += f"  val mAP {r['val_map'] * 100:.1f}"
    if "cam_miou" in r:
        text += f"  CAM mIoU {r['cam_miou'] * 100:.1f}"
    return text
