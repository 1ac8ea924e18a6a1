"""Phase 4: online retraining of a Segmenter on pseudo-label seeds with gradient clipping.

`retrain(train_set, seeds, out, config)` trains `weaktr_cli.models.segmenter.Segmenter` on the
seeds of a ``labels`` artifact (or threshold seeds computed on the fly from a ``cams``
artifact) with the paper's recipe by default (`RetrainConfig`), on the shared skeleton of
`weaktr_cli.training`: a self-describing checkpoint (kind "segmenter"), `<out>.last` /
`<out>.state` for an exact `resume=True`, unchanged under torchrun (DDP; gloo on CPU).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from weaktr_cli.data.base import IGNORE_INDEX, SegmentationDataset
from weaktr_cli.errors import WeakTrError
from weaktr_cli.losses import ClipLossResult, gradient_clipping_loss, plain_ce_loss
from weaktr_cli.models.io import segmenter_meta
from weaktr_cli.models.segmenter import Segmenter, build_segmenter, param_groups
from weaktr_cli.retrain.samples import EpochSampler, ItemError, RetrainSamples, collate_samples
from weaktr_cli.retrain.seed_source import SeedSource, check_seeds
from weaktr_cli.runtime import autocast
from weaktr_cli.settings import RetrainConfig
from weaktr_cli.training import TrainingOptions, TrainingRun, per_process_batch, training_run

__all__ = ["RetrainResult", "build_model", "poly_lr", "retrain"]


@dataclass
class RetrainResult:
    """What `retrain` returns: the checkpoint, the log records, the clipping threshold used."""

    checkpoint: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    tau: float | None = None
    steps: int = 0


# Sums accumulated between log records (all-reduced across ranks before logging).
_SUM_KEYS = ("n_steps", "images", "loss", "global_mean", "clipped_fraction", "clip_active",
             "kept", "kept_correct", "clipped", "clipped_correct")
#: Settings a resumed run may change: where it stops, how often it logs or saves, how many
#: workers load data. Everything else shapes the result.
_FREE_ON_RESUME = ("max_steps", "log_every", "save_every", "workers", "cache_images")


def build_model(config: RetrainConfig, n_cls: int) -> Segmenter:
    """A randomly initialised Segmenter for `config` with `n_cls` outputs."""
    return build_segmenter(
        n_cls,
        config.arch,
        img_size=config.crop_size,
        drop_path_rate=config.drop_path,
        norm_eps=config.norm_eps,
        pos_embed_interp=config.pos_embed_interp,
        decoder=config.decoder,
        decoder_layers=config.decoder_layers,
        decoder_dropout=config.decoder_dropout,
    )


def process_batch(config: RetrainConfig, world: int) -> int:
    """Images per process and step (see `training.per_process_batch`)."""
    return per_process_batch(config.batch_size, config.global_batch, world)


def poly_lr(step: int, total: int, lr: float, min_lr: float, power: float,
            warmup: int = 0) -> float:
    """Polynomial decay per iteration: (lr - min_lr) * (1 - step/total) ** power + min_lr,
    scaled by (step + 1) / warmup during the first `warmup` steps (linear warm-up)."""
    frac = min(max(step / max(total, 1), 0.0), 1.0)
    decayed = (lr - min_lr) * (1.0 - frac) ** power + min_lr
    return decayed * min(1.0, (step + 1) / warmup) if warmup > 0 else decayed


def _make_optimizer(model: Segmenter, config: RetrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, config.lr, config.encoder_lr_mult)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def retrain(
    train_set: SegmentationDataset,
    seeds: SeedSource | str | Path,
    out: str | Path,
    config: RetrainConfig,
    *,
    pretrained: str | Path | None = None,
    cams: str | Path | None = None,
    options: TrainingOptions = TrainingOptions(),
) -> RetrainResult:
    """Train a Segmenter on pseudo-label seeds and write its checkpoint to `out`.

    Args:
        train_set: the images (and, when it has masks, ground truth used for diagnostics only:
            the precision of kept / clipped seed pixels; never for training or selection).
        seeds: a `SeedSource`, or the path of a ``labels`` artifact. Every seed id must be in
            `train_set` and each seed map must have its image's size; images without seeds
            are skipped.
        out: checkpoint path (safetensors, kind "segmenter"). `<out>.last` and `<out>.state`
            are written every `save_every` steps (default: each epoch) for `options.resume`.
        pretrained: local ImageNet ViT weights for the encoder (never downloaded).
        cams: the CAM artifact the seeds came from, for `config.ambiguity` (default: the
            seeds' recorded parent).
        options: device, resume, and where the log lines, the JSONL records (one per
            `log_every` steps) and the progress go (`TrainingOptions`).

    The clipping threshold tau: the clipping loss is the plain mean until the batch's mean
    loss g drops to tau, so tau sets *when* clipping starts; which pixels are clipped then
    follows from the local means. A number applies from the first step: 1.2, the paper's, is
    the VOC default (its fresh 21-class decoder starts near ln 21 + 0.5 = 3.5, so clipping
    begins once the loss is a third of that). Numbers do not carry over between datasets: on
    the built-in shapes (7 classes, start ~2.2, plateau ~0.45 on 92 %-correct seeds) 1.2 is
    passed within the first 30 steps, while the model still learns the objects.
    With tau="auto" nothing is clipped during a warm-up window of `tau_auto_steps` steps
    (default one epoch) while g is recorded; then tau = tau_auto_fraction (default 1.0) x the
    mean g of the window's second half (all ranks agree through an all-reduce). The rule is
    scale-free: clipping starts once the model has fitted the seeds freely for an epoch and
    applies whenever the loss is at or below that level, whatever the number of classes,
    background share or seed noise set it to. Its value is logged and stored in the
    checkpoint (meta "tau"); docs/experiments.md has what it gave on the built-in dataset.

    Log records: step, epoch (fractional), loss (the optimised, clipped mean), global_mean
    (plain CE mean g), clipped_fraction (of non-ignored seed pixels), clip_active (share of
    steps with clipping on), lr (decoder group), tau, images_per_s and, with ground truth,
    kept_precision / clipped_precision: the share of kept / clipped seed pixels (with a
    ground-truth label) whose seed equals the ground truth (the paper's Fig. 5 diagnostic).
    """

    out = Path(out)
    config.check()
    if len(train_set) == 0:
        raise WeakTrError(f"training split {train_set.split!r} is empty")
    own_seeds = not isinstance(seeds, SeedSource)
    source = seeds if isinstance(seeds, SeedSource) else SeedSource(
        seeds, cams=cams, ambiguity=config.ambiguity)
    if source.ambiguity != config.ambiguity:
        raise WeakTrError(f"the seed source ignores ambiguous pixels at {source.ambiguity}, "
                          f"the config at {config.ambiguity}")
    try:
        return _retrain(train_set, source, out, config, pretrained=pretrained, options=options)
    finally:
        if own_seeds:
            source.close()


@dataclass(frozen=True)
class _Plan:
    """How long the run is: optimizer steps per epoch, in all, and where this process stops."""

    steps_per_epoch: int
    total: int
    stop_at: int
    tau_window: int  # warm-up steps of tau "auto" (0 otherwise)

    @classmethod
    def make(cls, config: RetrainConfig, images: int, world: int) -> _Plan:
        batch = process_batch(config, world)
        steps_per_epoch = images // (batch * world)
        if steps_per_epoch == 0:
            raise WeakTrError(
                f"{images} seeded images give no full batch of {batch} "
                f"per process ({world} process(es))",
                hint="lower --batch-size",
            )
        total = config.iterations or config.epochs * steps_per_epoch
        stop_at = total if config.max_steps is None else min(total, config.max_steps)
        auto_tau = config.clip and config.tau == "auto"
        tau_window = (config.tau_auto_steps or steps_per_epoch) if auto_tau else 0
        return cls(steps_per_epoch, total, stop_at, tau_window)


@dataclass
class _Progress:
    """What a resume restores besides weights, optimizer and RNG."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_SUM_KEYS, 0.0))
    window_g: list[float] = field(default_factory=list)
    tau: float | None = None

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "history": json.dumps(self.history),
                "sums": json.dumps(self.sums), "window_g": json.dumps(self.window_g),
                "tau": self.tau}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _Progress:
        return cls(step=int(state["step"]), history=json.loads(state["history"]),
                   sums=json.loads(state["sums"]), window_g=json.loads(state["window_g"]),
                   tau=None if state["tau"] is None else float(state["tau"]))


def _resume_settings(config: RetrainConfig, train_set: SegmentationDataset, ids: list[str],
                     seeds: SeedSource) -> dict[str, Any]:
    """The settings a resumed run must share with the interrupted one."""
    settings = {k: v for k, v in config.to_dict().items() if k not in _FREE_ON_RESUME}
    return {**settings, "dataset": train_set.name, "train_split": train_set.split,
            "class_names": list(train_set.class_names), "num_images": len(ids),
            "seeds_sha256": seeds.describe()["sha256"]}


def _retrain(
    train_set: SegmentationDataset,
    seeds: SeedSource,
    out: Path,
    config: RetrainConfig,
    *,
    pretrained: str | Path | None,
    options: TrainingOptions,
) -> RetrainResult:
    ids = check_seeds(seeds, train_set)
    if not out.parent.is_dir():
        raise WeakTrError(f"output folder {out.parent} does not exist")
    settings = _resume_settings(config, train_set, ids, seeds)
    with training_run(out, options, seed=config.seed, precision=config.precision,
                      settings=settings) as run:
        model = _initial_model(config, train_set.num_classes, pretrained, run)
        images = RetrainSamples(train_set, ids, seeds, config, train_set.has_masks)
        plan = _Plan.make(config, len(images), run.world)
        trainer = _Trainer(run, model, config, plan, with_gt=train_set.has_masks)
        if options.resume:
            trainer.resume()
            run.say(f"resumed at step {trainer.progress.step}")
        trainer.meta_base = {
            "kind": "segmenter",
            "model": segmenter_meta(model, config.arch, config.normalization),
            "class_names": list(train_set.class_names),
            "dataset": train_set.name,
            "train_split": train_set.split,
            "recipe": config.recipe,  # predict's default test time
            "train": config.to_dict(),
            "seeds": seeds.describe(),
            "num_images": len(ids),
            "world_size": run.world,
            "precision": run.precision,
            "pretrained": str(pretrained) if pretrained else None,
        }
        run.say(f"retraining {config.arch} on {len(ids)} seeded images ({seeds.kind}), "
                f"{plan.total} steps of {process_batch(config, run.world)} x {run.world}, "
                f"lr {config.lr:.1e} "
                f"{config.optimizer}, clip {_describe_tau(config, plan.tau_window)}, "
                f"{run.precision}, {run.device}")
        trainer.train(images)
    p = trainer.progress
    return RetrainResult(checkpoint=out, history=p.history, tau=p.tau, steps=p.step)


def _initial_model(config: RetrainConfig, n_cls: int, pretrained: str | Path | None,
                   run: TrainingRun) -> Segmenter:
    """A fresh Segmenter on the run's device, its encoder from `pretrained` when given."""
    from weaktr_cli.models.segmenter import use_explicit_attention
    from weaktr_cli.models.weights import load_encoder_weights

    model = build_model(config, n_cls)
    if pretrained is not None:
        what = load_encoder_weights(model, pretrained)
        run.say(f"loaded {'ImageNet' if what == 'imagenet' else 'CAM backbone'} weights from "
                f"{pretrained} into the {config.arch} encoder")
    if run.device.type == "cpu" and run.precision == "bf16":
        use_explicit_attention(model)
    return model.to(run.device)


class _Trainer:
    """The retraining loop: steps, the tau schedule, log records and resume points."""

    def __init__(self, run: TrainingRun, model: Segmenter, config: RetrainConfig, plan: _Plan,
                 *, with_gt: bool) -> None:
        self.run, self.model, self.config, self.plan = run, model, config, plan
        self.with_gt = with_gt
        self.optimizer = _make_optimizer(model, config)
        self.scaler = torch.amp.GradScaler(enabled=run.precision == "fp16")
        self.train_model = run.wrap(model)
        fixed_tau = config.clip and config.tau != "auto"
        self.progress = _Progress(tau=float(config.tau) if fixed_tau else None)
        self.meta_base: dict[str, Any] = {}

    def resume(self) -> None:
        state = self.run.resume(self.model, "segmenter")
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = _Progress.from_state(state)
        torch.set_rng_state(state["torch_rng"])
        dev = self.run.device
        if dev.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], dev)

    def _batches(self, images: RetrainSamples) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rest of the current epoch's batches, on the device."""
        config, plan, run = self.config, self.plan, self.run
        epoch, start_batch = divmod(self.progress.step, plan.steps_per_epoch)
        sampler = EpochSampler(len(images), config.seed, epoch, run.dist.rank, run.world,
                               process_batch(config, run.world), plan.steps_per_epoch,
                               start_batch)
        # A private generator: creating a loader must not draw from the global RNG
        # (dropout's), or a resumed run would see another random stream.
        loader = DataLoader(images, batch_size=process_batch(config, run.world), sampler=sampler,
                            num_workers=config.workers, collate_fn=collate_samples,
                            drop_last=True,
                            generator=torch.Generator().manual_seed(config.seed))
        for batch in loader:
            if isinstance(batch, ItemError):
                raise WeakTrError(batch.message, hint=batch.hint)
            inputs, labels = batch
            yield (inputs.to(run.device, non_blocking=True),
                   labels.to(run.device, non_blocking=True).long())

    def train(self, images: RetrainSamples) -> None:
        plan, p = self.plan, self.progress
        started, timed_images = time.perf_counter(), 0
        self.train_model.train()
        while p.step < plan.stop_at:
            for inputs, labels in self._batches(images):
                self._step(inputs, labels[:, 0], labels[:, 1])
                timed_images += len(inputs)
                self.run.report_progress(p.step, plan.total)
                at_end = p.step >= plan.stop_at
                if p.step % self.config.log_every == 0 or at_end:
                    elapsed = time.perf_counter() - started
                    self._log(timed_images * self.run.world / max(elapsed, 1e-9))
                    started, timed_images = time.perf_counter(), 0
                save_every = self.config.save_every or plan.steps_per_epoch
                if at_end or p.step % save_every == 0:
                    self._save(final=at_end)
                if at_end:
                    break

    def _step(self, inputs: torch.Tensor, seed_map: torch.Tensor, gt: torch.Tensor) -> None:
        """One optimizer step; adds its figures to the sums of the next log record."""
        config, plan, p, run = self.config, self.plan, self.progress, self.run
        for group in self.optimizer.param_groups:
            lr = poly_lr(p.step, plan.total, config.lr, config.min_lr, config.poly_power,
                         config.warmup_iters)
            group["lr"] = lr * group["lr_mult"]
        with autocast(run.device, run.precision):
            logits = self.train_model(inputs)
        if p.tau is None:
            result = plain_ce_loss(logits, seed_map)
        else:
            result = gradient_clipping_loss(logits, seed_map, tau=p.tau,
                                            patch_size=config.clip_patch)
        if not torch.isfinite(result.loss):
            raise WeakTrError(
                f"training diverged: loss is {result.loss.item()} at step {p.step + 1}",
                hint="lower --lr or use --precision fp32",
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(result.loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        p.step += 1
        g = float(result.global_mean)
        kept, kept_ok, clipped, clipped_ok = _precision_counts(result, seed_map, gt)
        active = p.tau is not None and g <= p.tau
        for key, value in (
            ("n_steps", 1.0), ("images", float(len(inputs))),
            ("loss", float(result.loss.detach())), ("global_mean", g),
            ("clipped_fraction", float(result.clipped_fraction)),
            ("clip_active", float(active)), ("kept", float(kept)),
            ("kept_correct", float(kept_ok)), ("clipped", float(clipped)),
            ("clipped_correct", float(clipped_ok)),
        ):
            p.sums[key] += value
        if plan.tau_window and p.tau is None:
            p.window_g.append(g)
            if len(p.window_g) >= plan.tau_window:
                p.tau = _auto_tau(p.window_g, config.tau_auto_fraction, run)
                run.say(f"tau auto: {p.tau:.4f} = {config.tau_auto_fraction} x the mean loss "
                        f"of steps {len(p.window_g) // 2 + 1}-{len(p.window_g)}")

    def _log(self, images_per_s: float) -> None:
        p = self.progress
        record = _record(p.sums, self.run, p.step, self.plan.steps_per_epoch, self.optimizer,
                         p.tau, self.with_gt)
        record["images_per_s"] = images_per_s
        p.sums = dict.fromkeys(_SUM_KEYS, 0.0)
        if self.run.is_main:
            p.history.append(record)
            self.run.say(_format_record(record, self.plan.total))
            self.run.log_record(record)

    def _save(self, final: bool) -> None:
        if not self.run.is_main:
            return
        p, dev = self.progress, self.run.device
        # Timings stay out of the checkpoint so seeded runs give identical files.
        last = {k: v for k, v in p.history[-1].items() if k != "images_per_s"} if p.history else {}
        meta = {**self.meta_base, "step": p.step, "tau": p.tau, "final": last}
        self.run.save_last(self.model, meta)
        self.run.save_state({
            "optimizer": self.optimizer.state_dict(),
            **p.state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
        })
        if final:
            from weaktr_cli.checkpoints import save_checkpoint

            save_checkpoint(self.run.out, self.model.state_dict(), meta)


def _precision_counts(result: ClipLossResult, seed: torch.Tensor, gt: torch.Tensor
                      ) -> tuple[torch.Tensor, ...]:
    """(kept, kept_correct, clipped, clipped_correct) over pixels with ground truth."""
    scored = gt != IGNORE_INDEX
    valid = (seed != IGNORE_INDEX) & scored
    kept = result.kept_mask & scored
    clipped = valid & ~result.kept_mask
    correct = seed == gt
    return (kept.sum(), (kept & correct).sum(), clipped.sum(), (clipped & correct).sum())


def _describe_tau(config: RetrainConfig, window: int) -> str:
    if not config.clip:
        return "off"
    if config.tau == "auto":
        return f"tau auto ({config.tau_auto_fraction} x mean loss of a {window}-step warm-up)"
    return f"tau {float(config.tau)}"


def _auto_tau(window_g: list[float], fraction: float, run: TrainingRun) -> float:
    """fraction x the mean of the second half of the warm-up losses (averaged over ranks)."""
    tail = window_g[len(window_g) // 2 :]
    mean = float(np.mean(tail))
    if run.dist.enabled:
        mean = run.all_reduce_sum([mean])[0] / run.world
    return fraction * mean


def _record(sums: dict[str, float], run: TrainingRun, step: int, steps_per_epoch: int,
            optimizer: torch.optim.Optimizer, tau: float | None, with_gt: bool
            ) -> dict[str, Any]:
    values = run.all_reduce_sum([sums[k] for k in _SUM_KEYS])
    s = dict(zip(_SUM_KEYS, values, strict=True))
    n = max(s["n_steps"], 1.0)
    decoder_lr = next(g["lr"] for g in optimizer.param_groups if g.get("name") == "decoder")
    record: dict[str, Any] = {
        "step": step,
        "epoch": round(step / steps_per_epoch, 4),
        "loss": s["loss"] / n,
        "global_mean": s["global_mean"] / n,
        "clipped_fraction": s["clipped_fraction"] / n,
        "clip_active": s["clip_active"] / n,
        "lr": decoder_lr,
        "tau": tau,
    }
    if with_gt:
        record["kept_precision"] = s["kept_correct"] / s["kept"] if s["kept"] else None
        record["clipped_precision"] = (
            s["clipped_correct"] / s["clipped"] if s["clipped"] else None
        )
    return record


def _format_record(r: dict[str, Any], total: int) -> str:
    text = (f"step {r['step']:6d}/{total}  loss {r['loss']:.4f}  g {r['global_mean']:.4f}  "
            f"clipped {r['clipped_fraction'] * 100:5.1f}%  lr {r['lr']:.2e}  "
            f"{r['images_per_s']:.1f} img/s")
    if r.get("kept_precision") is not None:
        text += f"  kept prec {r['kept_precision'] * 100:.1f}"
    if r.get("clipped_precision") is not None:
        text += f"  clipped prec {r['clipped_precision'] * 100:.1f}"
    return text
