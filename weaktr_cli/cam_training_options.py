"""CAM-training choices where the reference and weaktr's own recipes differ (docs/REPRODUCING.md).

- augmentation: weaktr's torchvision pipeline (bilinear RandomResizedCrop, RandAugment m9 with
  black fill, erasing with zeros) or the reference's timm factory (`create_transform`: bicubic
  crop, `rand-m9-mstd0.5-inc1`, random erasing in `pixel` mode; hustvl/WeakTr 0ff9d9a
  datasets.py:194-214, main.py:106-127);
- which parameters are weight-decayed: weaktr's default exempts 1-D parameters and biases;
  3547b87 passes the model to timm's factory, which also exempts the model's `no_weight_decay`
  set (`pos_embed`, `cls_token`; main.py:343); 0ff9d9a passes `model.parameters()`, so every
  parameter is decayed (main.py:360);
- the cosine schedule: weaktr steps it per optimizer step; the reference steps it once per
  epoch, after the epoch (`lr_scheduler.step(epoch)`, main.py:380 / :399), so epoch e trains
  at lr(e - 1) and the first two epochs at the warm-up start.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from weaktr_cli.errors import WeakTrError

__all__ = [
    "AUGMENTATIONS",
    "DECAY_POLICIES",
    "SCHEDULE_UNITS",
    "build_cam_optimizer",
    "build_cam_scheduler",
    "timm_cam_transform",
]

AUGMENTATIONS = ("torchvision", "timm")
#: "exempt-1d": 1-D parameters and biases undecayed (weaktr's default); "exempt-1d-tokens":
#: also the class tokens and positional embedding (3547b87); "all": every parameter (0ff9d9a).
DECAY_POLICIES = ("exempt-1d", "exempt-1d-tokens", "all")
SCHEDULE_UNITS = ("step", "epoch")
#: WeakTrCAM's counterpart of timm's ViT `no_weight_decay()` (what 3547b87's model reports).
_TOKEN_PARAMS = ("cls_token", "pos_embed")


def _check(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise WeakTrError(f"unknown {what} {value!r}", hint=f"use {', '.join(choices)}")


def timm_cam_transform(size: int, *, auto_augment: str = "rand-m9-mstd0.5-inc1",
                       interpolation: str = "bicubic", re_prob: float = 0.25,
                       re_mode: str = "pixel", color_jitter: float = 0.4,
                       crop_scale: tuple[float, float] = (0.08, 1.0)
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reference's CAM training transform from timm's factory, for (3, H, W) uint8 tensors.

    Returns a callable giving the normalised (3, size, size) float tensor (ImageNet statistics),
    random erasing applied after normalisation as timm does.
    """
    from timm.data import create_transform
    from torchvision.transforms.v2 import functional as TF

    transform = create_transform(
        input_size=size, is_training=True, color_jitter=color_jitter, auto_augment=auto_augment,
        interpolation=interpolation, re_prob=re_prob, re_mode=re_mode, re_count=1,
        scale=crop_scale,
    )

    def apply(image: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = transform(TF.to_pil_image(image))
        return out

    return apply


def build_cam_optimizer(model: nn.Module, *, lr: float, weight_decay: float,
                        policy: str = "exempt-1d") -> torch.optim.Optimizer:
    """AdamW through timm's factory with one of `DECAY_POLICIES`."""
    from timm.optim import create_optimizer_v2

    _check(policy, DECAY_POLICIES, "weight-decay policy")
    target: Any
    if policy == "all":
        target = model.parameters()
    elif policy == "exempt-1d-tokens" and weight_decay:
        # timm's rule (ndim <= 1 or a bias) plus the model's no-weight-decay names.
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            exempt = param.ndim <= 1 or name.endswith(".bias") or name in _TOKEN_PARAMS
            (no_decay if exempt else decay).append(param)
        target = [{"params": no_decay, "weight_decay": 0.0},
                  {"params": decay, "weight_decay": weight_decay}]
    else:
        target = model
    optimizer: torch.optim.Optimizer = create_optimizer_v2(
        target, opt="adamw", lr=lr, weight_decay=weight_decay)
    return optimizer


def build_cam_scheduler(optimizer: torch.optim.Optimizer, *, epochs: int, steps_per_epoch: int,
                        warmup_epochs: float, warmup_lr: float, min_lr: float,
                        unit: str = "step") -> Any:
    """timm's cosine schedule with warm-up, counted in optimizer steps or in epochs.

    unit "step": call `step_update(step)` after every optimizer step (weaktr's default).
    unit "epoch": call `step(epoch)` after each epoch (the reference; cycle decay 0.1 and one
    cycle, as timm 0.5.4's `create_scheduler`).
    """
    from timm.scheduler import CosineLRScheduler

    _check(unit, SCHEDULE_UNITS, "schedule unit")
    if unit == "epoch":
        return CosineLRScheduler(optimizer, t_initial=epochs, lr_min=min_lr,
                                 warmup_t=int(warmup_epochs), warmup_lr_init=warmup_lr,
                                 cycle_decay=0.1, cycle_limit=1, t_in_epochs=True)
    return CosineLRScheduler(optimizer, t_initial=epochs * steps_per_epoch, lr_min=min_lr,
                             warmup_t=int(warmup_epochs * steps_per_epoch),
                             warmup_lr_init=warmup_lr, t_in_epochs=False)
