"""The settings of every phase: plain dataclasses, importable without torch.

`CamTrainConfig` (phase 1), `CamSettings` (phase 2), `RetrainConfig` (phase 4) and
`PredictSettings` (inference) are what `weaktr_cli.recipes` names per dataset and what the
library functions take. Each has a `check()` that raises `WeakTrError` for values that cannot
work; the checks that need a model class import it when they run, so the `crf` and
`predict --onnx` paths never load torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from weaktr_cli.errors import WeakTrError

__all__ = [
    "CAM_VARIANTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORMALIZATIONS",
    "OPTIMIZERS",
    "PROCEDURES",
    "SELECTIONS",
    "CamSettings",
    "CamTrainConfig",
    "PredictSettings",
    "RetrainConfig",
    "check_inference_windows",
    "resolve_normalization",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Input normalisation (mean, std) of the encoder's pretraining: ImageNet statistics for DeiT,
#: 0.5/0.5 ("inception") for the IN-21k ViT-S of the paper's strongest model.
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # The reference's: ImageNet statistics x 255 rounded to 2 decimals (hustvl/WeakTr 0ff9d9a
    # OnlineRetraining/segm/data/base.py:35-37): 123.68/116.28/103.53, 58.4/57.12/57.38.
    "imagenet-rounded": ((123.68 / 255, 116.28 / 255, 103.53 / 255),
                         (58.4 / 255, 57.12 / 255, 57.38 / 255)),
}

#: The CAMs `weaktr_cli.models.cam_vit.cam_maps` can return.
CAM_VARIANTS = ("fine", "cross", "coarse")
#: How `train_cam` picks the checkpoint it keeps.
SELECTIONS = ("last", "val-map", "cam-miou")
OPTIMIZERS = ("sgd", "adamw")
#: `PredictSettings.procedure` values.
PROCEDURES = ("weaktr", "reference")


def resolve_normalization(name: str, arch: str) -> str:
    """"auto" -> "inception" for the `vit-*` (IN-21k) backbones, else "imagenet";
    "reference" -> "inception" for `vit-*`, else "imagenet-rounded" (the reference's)."""
    if name in ("auto", "reference"):
        if arch.startswith("vit-"):
            return "inception"
        return "imagenet" if name == "auto" else "imagenet-rounded"
    if name not in NORMALIZATIONS:
        raise WeakTrError(
            f"unknown normalization {name!r}",
            hint=f"use auto, reference, {', '.join(NORMALIZATIONS)}"
        )
    return name


# ----------------------------------------------------------------------------- phase 1


@dataclass
class CamTrainConfig:
    """Every setting of a CAM training run (recorded in the checkpoint).

    Defaults are the paper's VOC recipe (docs/method.md, phase 1); the built-in dataset's
    recipe lives in `recipes.py`.
    """

    arch: str = "deit-small"
    fusion: str = "aaf"
    aaf_pool: str | None = None  # None: the fusion's recipe (aaf avg, aaf-feat max)
    aaf_reduction: float | None = None  # None: the fusion's recipe (aaf 4, aaf-feat 8)
    epochs: int = 60
    batch_size: int = 64  # per process; the global batch with `global_batch`
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
    max_steps: int | None = None  # stop early (tests); the schedule still spans all epochs
    # Where the reference trains differently (weaktr_cli.cam_training_options,
    # docs/REPRODUCING.md); the defaults are weaktr's own choices, the paper/release recipes
    # set the reference's.
    augment: str = "torchvision"  # or "timm": timm's create_transform, as the reference
    decay_policy: str = "exempt-1d"  # "exempt-1d-tokens" (3547b87) or "all" (0ff9d9a)
    schedule_unit: str = "step"  # or "epoch": cosine stepped after each epoch
    global_batch: bool = False  # batch_size is the global batch, split over the processes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Raise `WeakTrError` for settings that cannot work."""
        from weaktr_cli.cam_training_options import AUGMENTATIONS, DECAY_POLICIES, SCHEDULE_UNITS

        if self.select not in SELECTIONS:
            raise WeakTrError(f"unknown selection {self.select!r}",
                              hint=f"choose one of {', '.join(SELECTIONS)}")
        for value, choices, what in ((self.augment, AUGMENTATIONS, "augmentation"),
                                     (self.decay_policy, DECAY_POLICIES, "decay policy"),
                                     (self.schedule_unit, SCHEDULE_UNITS, "schedule unit")):
            if value not in choices:
                raise WeakTrError(f"unknown {what} {value!r}",
                                  hint=f"choose one of {', '.join(choices)}")


# ----------------------------------------------------------------------------- phase 2


@dataclass(frozen=True)
class CamSettings:
    """How CAMs are inferred: test-time scales and flip, the `cam_maps` variant, and `power`,
    an exponent applied after min-max normalisation. A power below 1 lifts the low end of a
    peaky map so that its best background threshold lands in the usual 0.3-0.6 range; it is
    monotone, so the CAM mIoU at the best threshold does not change (1.0: the reference)."""

    scales: tuple[float, ...] = (1.0, 1.2)
    flip: bool = True
    variant: str = "fine"
    precision: str = "auto"
    batch_size: int = 8
    power: float = 1.0
    #: longest image side the model sees, before the scales (None: no limit); CAMs are still
    #: written at the image's own size. Bounds the memory of large photos; VOC and COCO images
    #: (at most 640 px) are never resized by it.
    max_size: int | None = 1024
    #: min-max epsilon: (m - min) / (max - min + eps); the reference's is 1e-8
    minmax_eps: float = 1e-5

    def check(self) -> None:
        if not self.minmax_eps > 0:
            raise WeakTrError(f"invalid min-max epsilon {self.minmax_eps}")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise WeakTrError(f"invalid scales {self.scales}", hint="e.g. --scales 1.0,1.2")
        if not self.power > 0:
            raise WeakTrError(f"invalid CAM power {self.power}", hint="use a number > 0, e.g. 0.5")
        if self.max_size is not None and self.max_size < 16:
            raise WeakTrError(f"invalid max size {self.max_size}",
                              hint="at least 16 pixels (e.g. --max-size 1024), 0 for no limit")
        if self.variant not in CAM_VARIANTS:
            raise WeakTrError(f"unknown CAM variant {self.variant!r}",
                              hint=f"choose one of {', '.join(CAM_VARIANTS)}")


# ----------------------------------------------------------------------------- phase 4


@dataclass
class RetrainConfig:
    """Every setting of a retraining run (recorded in the checkpoint).

    Defaults are the paper's VOC recipe (docs/method.md, phase 4); `weaktr_cli.recipes` holds it and
    the CPU-sized recipe of the built-in shapes dataset.

    Scale: each image's short side is rescaled to `scale_range` x `crop_size` (uniform), so the
    default (260/480, 1040/480) gives the reference's 260-1040 px for 480 crops. Then a random
    `crop_size` crop is taken (up to 10 tries to find one where no class covers more than
    `cat_max_ratio` of the labelled pixels), padded with zeros (image, after normalisation) and
    255 (labels) when the image is smaller.

    Schedule: `iterations` optimizer steps if given, else `epochs` x (images // (batch x world)).
    lr(t) = (lr - min_lr) * (1 - t / T) ** poly_power + min_lr, per iteration, times
    (t + 1) / warmup_iters during an optional linear warm-up; the encoder
    group gets lr(t) * encoder_lr_mult, the decoder lr(t) (so the encoder ends at
    min_lr * encoder_lr_mult).

    tau: a number, or "auto" (see `retrain`): clipping switches on once the global mean loss
    is <= tau. `clip=False` trains with plain cross-entropy (the `--no-clip` baseline).

    ambiguity: None, or a ratio r in (0, 1]: foreground seed pixels where another class of the
    image has a CAM >= r x the seed class's are ignored (`SeedSource`; needs the CAMs).
    """

    arch: str = "vit-small"
    crop_size: int = 480
    scale_range: tuple[float, float] = (260 / 480, 1040 / 480)
    cat_max_ratio: float = 0.75
    flip: bool = True
    photometric: bool = True
    normalization: str = "auto"
    batch_size: int = 4
    epochs: int = 100
    iterations: int | None = None
    optimizer: str = "sgd"
    lr: float = 1e-4
    min_lr: float = 1e-5
    poly_power: float = 0.9
    warmup_iters: int = 0  # linear warm-up steps (the paper: none)
    momentum: float = 0.9
    weight_decay: float = 0.0
    encoder_lr_mult: float = 0.1
    clip: bool = True
    tau: float | str = 1.2
    tau_auto_fraction: float = 1.0
    tau_auto_steps: int | None = None  # warm-up window of tau="auto"; None = one epoch
    clip_patch: int = 120
    drop_path: float = 0.1
    decoder: str = "mask"  # Segmenter's mask transformer (the paper's) or "linear"
    ambiguity: float | None = None  # ignore seed pixels two classes' CAMs share (None: off)
    decoder_layers: int = 2
    decoder_dropout: float = 0.1
    #: encoder LayerNorm epsilon and position-embedding resampling ("bicubic" timm's,
    #: "bilinear" the reference's Segmenter; its eps is 1e-5)
    norm_eps: float = 1e-6
    pos_embed_interp: str = "bicubic"
    global_batch: bool = False  # batch_size is the global batch, split over the processes
    precision: str = "auto"
    seed: int = 0
    workers: int = 0
    cache_images: bool = False
    log_every: int = 50
    save_every: int | None = None  # optimizer steps between resume points; None = each epoch
    max_steps: int | None = None  # stop early (tests); the schedule still spans the whole run
    #: the recipe these settings came from (`weaktr_cli.recipes` fills it in; None: built by
    #: hand). The checkpoint records it, so `predict` applies that recipe's test time.
    recipe: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Raise `WeakTrError` for settings that cannot work."""
        from weaktr_cli.models.registry import get_arch
        from weaktr_cli.models.segmenter import check_decoder

        get_arch(self.arch)
        check_decoder(self.decoder)
        lo, hi = self.scale_range
        if not (0 < lo <= hi):
            raise WeakTrError(
                f"invalid scale range {self.scale_range}",
                hint="short side / crop size, e.g. 0.5,2.0",
            )
        if self.crop_size < 8 or self.batch_size < 1:
            raise WeakTrError("crop size must be >= 8 and batch size >= 1")
        if self.optimizer not in OPTIMIZERS:
            raise WeakTrError(
                f"unknown optimizer {self.optimizer!r}", hint=f"use {', '.join(OPTIMIZERS)}"
            )
        if self.iterations is None and self.epochs < 1:
            raise WeakTrError("epochs must be >= 1 (or give iterations)")
        if self.iterations is not None and self.iterations < 1:
            raise WeakTrError("iterations must be >= 1")
        if self.warmup_iters < 0:
            raise WeakTrError("warmup_iters must be >= 0")
        if not (0 <= self.min_lr <= self.lr):
            raise WeakTrError(f"need 0 <= min_lr <= lr, got {self.min_lr} and {self.lr}")
        if isinstance(self.tau, str):
            if self.tau != "auto":
                raise WeakTrError(f"invalid tau {self.tau!r}", hint="a number or 'auto'")
            if not self.tau_auto_fraction > 0:
                raise WeakTrError("tau_auto_fraction must be > 0")
        elif not math.isfinite(float(self.tau)):
            raise WeakTrError(f"invalid tau {self.tau!r}", hint="a finite number or 'auto'")
        elif not float(self.tau) > 0:
            # Clipping starts once the mean loss falls to tau; a loss is never <= 0.
            raise WeakTrError(f"invalid tau {self.tau}: clipping would never start",
                              hint="a number > 0 (the paper's 1.2) or 'auto'")
        if self.clip_patch < 1:
            raise WeakTrError("the clipping patch size must be >= 1 pixel")
        if self.ambiguity is not None and not 0.0 < self.ambiguity <= 1.0:
            raise WeakTrError(f"invalid ambiguity ratio {self.ambiguity}",
                              hint="a ratio in (0, 1], e.g. 0.7, or none")
        from weaktr_cli.models.segmenter import POS_EMBED_INTERPOLATIONS

        if self.pos_embed_interp not in POS_EMBED_INTERPOLATIONS:
            raise WeakTrError(f"unknown position-embedding interpolation "
                              f"{self.pos_embed_interp!r}",
                              hint=f"use {' or '.join(POS_EMBED_INTERPOLATIONS)}")
        if not self.norm_eps > 0:
            raise WeakTrError(f"invalid LayerNorm epsilon {self.norm_eps}")
        if self.log_every < 1 or (self.save_every is not None and self.save_every < 1):
            raise WeakTrError("log_every and save_every must be >= 1")
        resolve_normalization(self.normalization, self.arch)


# ----------------------------------------------------------------------------- inference


def check_inference_windows(
    *,
    window: int,
    stride: int,
    scales: Sequence[float],
    base_size: int | None,
    batch_size: int,
    layer_weights: Sequence[float] | None,
    crf: str | None,
    procedure: str = "weaktr",
) -> None:
    """The checks that torch and ONNX inference share (`PredictSettings`,
    `weaktr_cli.onnx_infer.OnnxPredictSettings`); each adds what only its model can tell."""
    if window < 1 or stride < 1:
        raise WeakTrError(f"invalid window {window} / stride {stride}")
    if stride > window:
        raise WeakTrError(
            f"stride {stride} is larger than the window {window}: pixels between "
            "windows would get no prediction", hint="use a stride <= the window",
        )
    if not scales or any(not s > 0 for s in scales):
        raise WeakTrError(f"invalid scales {tuple(scales)}", hint="e.g. 0.5,1.0,1.5")
    if base_size is not None and base_size < 1:
        raise WeakTrError(f"invalid base size {base_size}")
    if batch_size < 1:
        raise WeakTrError("batch size must be >= 1")
    if layer_weights is not None and (
            not layer_weights or any(w < 0 for w in layer_weights) or not sum(layer_weights) > 0):
        raise WeakTrError(f"invalid layer weights {tuple(layer_weights)}",
                          hint="non-negative numbers, e.g. 0.8,1.0")
    if procedure not in PROCEDURES:
        raise WeakTrError(f"unknown test-time procedure {procedure!r}",
                          hint=f"use {' or '.join(PROCEDURES)}")
    if procedure == "reference" and base_size is None:
        raise WeakTrError("the reference's procedure needs a base size (its im_size, 520)")
    if crf is not None:
        from weaktr_cli.dense_crf import get_preset

        get_preset(crf)


@dataclass(frozen=True)
class PredictSettings:
    """How `weaktr_cli.predict.predict_probs` runs a model over one image (see that module).

    window / stride: sliding-window crop and step in pixels (reference 480 / 320).
    scales / base_size: passes at short side scale x base_size (reference: ratios 0.5-1.75 of
        512); base_size None scales the image's own size.
    flip: also run the mirrored image of every scale.
    layer_weights: per-decoder-layer weights for the probabilities ((0.8, 1.0) is the
        reference's 0.8 P1 + P2); None uses the last layer only.
    normalization: input normalisation name (`NORMALIZATIONS`); take it from the checkpoint
        (`weaktr_cli.predict.settings_for_checkpoint`).
    precision: "auto" (bf16 on CUDA or fast-bf16 CPUs, else fp32), "fp32", "bf16", "fp16".
    crf: a `weaktr_cli.dense_crf` preset name ("voc-test", "coco-test") or None.
    batch_size: windows per forward pass.
    procedure: "weaktr" (above) or "reference": the reference's test-time procedure
        (`weaktr_cli.test_time`; `base_size` is then its im_size, 520 for VOC and COCO): its
        two-stage resize rule, per-layer view averaging, layers fused without renormalising
        and the CRF fed the fused planes as they are (docs/REPRODUCING.md).
    """

    window: int = 480
    stride: int = 320
    scales: tuple[float, ...] = (1.0,)
    base_size: int | None = None
    flip: bool = True
    layer_weights: tuple[float, ...] | None = None
    normalization: str = "imagenet"
    precision: str = "auto"
    crf: str | None = None
    batch_size: int = 4
    procedure: str = "weaktr"

    def check(self, num_decoder_layers: int | None = None) -> None:
        """Raise `WeakTrError` for settings that cannot work (given the model's decoder layer
        count, the layer weights too)."""
        check_inference_windows(window=self.window, stride=self.stride, scales=self.scales,
                                base_size=self.base_size, batch_size=self.batch_size,
                                layer_weights=self.layer_weights, crf=self.crf,
                                procedure=self.procedure)
        if self.normalization not in NORMALIZATIONS:
            raise WeakTrError(f"unknown normalization {self.normalization!r}",
                              hint=f"use {', '.join(NORMALIZATIONS)}")
        if (self.layer_weights is not None and num_decoder_layers is not None
                and len(self.layer_weights) != num_decoder_layers):
            raise WeakTrError(
                f"{len(self.layer_weights)} layer weights for a decoder of "
                f"{num_decoder_layers} layers",
                hint="give one weight per decoder layer",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
