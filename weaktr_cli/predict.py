"""Segmentation inference with a retrained Segmenter: sliding windows, multi-scale, flip, CRF.

Per image (docs/method.md, phase 4 inference, reference `segm/model/utils.py:inference`), for each
scale and (with `flip`) the mirrored image:

1. resize (bilinear) so the short side is scale x `base_size` (or scale x the image's own short
   side when `base_size` is None); then, if the short side is below `window`, upsample it to
   `window` (aspect kept), so every window is full;
2. run `window` x `window` crops at `stride` (the last row/column of windows is aligned to the
   bottom/right border) and average the logits where windows overlap;
3. upsample the logits bilinearly to the original size, un-mirror, softmax over classes;
4. with `layer_weights`, do this for every decoder layer and mix the probabilities
   (reference: 0.8 P1 + P2, normalised here by the weight sum so they stay probabilities).

The probabilities of all passes are averaged. The label is the argmax, optionally refined by a
dense CRF on the probabilities of the classes present in the argmax (as the reference does).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from weaktr_cli.artifacts import Entry, file_sha256, new_meta
from weaktr_cli.data.align import check_class_names
from weaktr_cli.data.loader import to_tensor
from weaktr_cli.dense_crf import label_from_probs
from weaktr_cli.errors import WeakTrError
from weaktr_cli.label_pngs import write_png_dir
from weaktr_cli.models.segmenter import Segmenter
from weaktr_cli.per_image import PerImageRun
from weaktr_cli.runtime import (
    FreedMemoryReleaser,
    resolve_precision,
    select_device,
)
from weaktr_cli.settings import NORMALIZATIONS, PROCEDURES, PredictSettings
from weaktr_cli.test_time import sliding_logits
from weaktr_cli.windows import pass_size

__all__ = [
    "PAPER_PREDICT",
    "PROCEDURES",
    "PredictSettings",
    "label_from_probs",
    "predict_probs",
    "predict_split",
    "settings_for_checkpoint",
    "write_png_dir",
]


#: The reference's multi-scale test time for VOC (docs/REPRODUCING.md): its procedure at
#: im_size 520, window 480 stride 320, ratios 0.5-1.75 with flips, 0.8 P1 + P2 and the CRF, in
#: fp32; take the normalisation from the checkpoint.
PAPER_PREDICT = PredictSettings(
    window=480,
    stride=320,
    scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
    base_size=520,
    flip=True,
    layer_weights=(0.8, 1.0),
    precision="fp32",
    crf="voc-test",
    procedure="reference",
)


def settings_for_checkpoint(meta: dict[str, Any], settings: PredictSettings | None = None,
                            **overrides: Any) -> PredictSettings:
    """`settings` (default `PredictSettings()`) fitted to a segmenter checkpoint's metadata.

    The window becomes the training crop and the stride 2/3 of it (reference 480 / 320), and the
    normalisation the encoder's, unless `overrides` name them; other `overrides` replace fields.
    """
    model_meta = meta.get("model", {})
    crop = int(model_meta.get("img_size", 480))
    values: dict[str, Any] = {
        "window": crop,
        "stride": max(1, crop * 2 // 3),
        "normalization": model_meta.get("normalization", "imagenet"),
    }
    values.update(overrides)
    return replace(settings or PredictSettings(), **values)


def _sliding_logits(model: Segmenter, image: torch.Tensor, settings: PredictSettings,
                    precision: str, layers: bool) -> list[torch.Tensor]:
    """Merged window logits of a (1, 3, H, W) normalised image with H, W >= window: one
    float32 (n_cls, H, W) tensor per decoder layer (or only the last one)."""
    last = model.num_decoder_layers - 1
    return sliding_logits(model, image, settings.window, settings.stride, settings.batch_size,
                          precision, list(range(last + 1)) if layers else [last])


@torch.inference_mode()
def predict_probs(
    model: Segmenter,
    image: np.ndarray,
    settings: PredictSettings = PredictSettings(),
    device: str | torch.device = "auto",
) -> np.ndarray:
    """Class probabilities of one image.

    Args:
        model: a Segmenter in eval mode (moved to `device` here if it is elsewhere).
        image: RGB (H, W, 3) uint8.
        settings: see `PredictSettings`.

    Returns:
        float32 (n_cls, H, W) softmax probabilities (each pixel sums to 1; with the
        reference's procedure to the sum of the layer weights, e.g. 1.8).
    """
    settings.check(model.num_decoder_layers)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise WeakTrError(f"expected an RGB (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    dev = select_device(device) if isinstance(device, str) else device
    precision = resolve_precision(settings.precision, dev, training=False)
    if next(model.parameters()).device != dev:
        model.to(dev)
    if model.training:  # eval() walks every module: a tenth of a small image's time
        model.eval()
    if settings.procedure == "reference":
        return _reference_probs(model, image, settings, precision)
    h, w = image.shape[:2]
    mean, std = NORMALIZATIONS[settings.normalization]
    m = torch.tensor(mean, device=dev).view(1, 3, 1, 1)
    s = torch.tensor(std, device=dev).view(1, 3, 1, 1)
    pixels = to_tensor(image)[None].to(dev).float()
    weights = settings.layer_weights
    total = torch.zeros(model.n_cls, h, w, device=dev)
    passes = 0
    for scale in settings.scales:
        size = pass_size(h, w, scale, settings.window, settings.base_size)
        scaled = pixels if size == (h, w) else F.interpolate(
            pixels, size=size, mode="bilinear", align_corners=False)
        batch = (scaled.clamp(0, 255) / 255.0 - m) / s
        for flipped in (False, True) if settings.flip else (False,):
            view = batch.flip(-1) if flipped else batch
            layers = _sliding_logits(model, view, settings, precision, weights is not None)
            mix = weights if weights is not None else (1.0,)
            for weight, logits in zip(mix, layers, strict=True):
                if weight == 0:
                    continue
                up = F.interpolate(logits[None], size=(h, w), mode="bilinear",
                                   align_corners=False)[0]
                if flipped:
                    up = up.flip(-1)
                total += (weight / sum(mix)) * up.softmax(dim=0)
            passes += 1
    probs: np.ndarray = (total / passes).cpu().numpy().astype(np.float32)
    return probs


def _reference_probs(model: Segmenter, image: np.ndarray, settings: PredictSettings,
                     precision: str) -> np.ndarray:
    """`predict_probs` with the reference's procedure: sum_k w_k P_k, not renormalised."""
    from weaktr_cli.test_time import fuse_layers, reference_layer_probs

    weights = settings.layer_weights or (0.0,) * (model.num_decoder_layers - 1) + (1.0,)
    used = [k for k, wk in enumerate(weights) if wk != 0]
    mean, std = NORMALIZATIONS[settings.normalization]
    assert settings.base_size is not None  # check() requires it
    layers = reference_layer_probs(
        model, image, ratios=settings.scales, flip=settings.flip, im_size=settings.base_size,
        window=settings.window, stride=settings.stride, mean=mean, std=std, layers=used,
        batch_size=settings.batch_size, precision=precision)
    fused = fuse_layers(layers, [weights[k] for k in used], normalize=False)
    probs: np.ndarray = fused.cpu().numpy().astype(np.float32)
    return probs


def predict_split(
    model: Segmenter,
    run: PerImageRun,
    settings: PredictSettings = PredictSettings(),
    *,
    class_names: Sequence[str],
    checkpoint: str | Path | None = None,
) -> Path:
    """Predict every image of `run.dataset` (or of `run`'s shard) into a ``labels`` artifact
    at `run.out_path`; returns the final artifact path.

    `class_names` are the model's classes (the checkpoint's); they must equal the dataset's so
    the artifact can be scored against it. `run`: the split and the artifact path, device,
    shard, resume and progress (`PerImageRun`). Ids already in a resumable `<out>.partial` made
    with the same settings and checkpoint are skipped (`ArtifactWriter` refuses one made
    otherwise).
    """
    settings.check(model.num_decoder_layers)
    dataset = run.dataset
    names = tuple(class_names)
    if len(names) != model.n_cls:
        raise WeakTrError(f"{len(names)} class names for a model with {model.n_cls} outputs")
    check_class_names(f"the model{f' {checkpoint}' if checkpoint else ''}", names, dataset,
                      hint="use the checkpoint trained on this dataset")
    dev = select_device(run.device)
    model = model.to(dev).eval()
    config = {
        "settings": settings.to_dict(),
        "precision": resolve_precision(settings.precision, dev, training=False),
        **run.config(),
        "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else None,
        "image_orientation": dataset.orientation,  # "exif" when EXIF rotations were applied
    }
    meta = new_meta("labels", dataset.name, dataset.split, names, config=config,
                    parents=[checkpoint] if checkpoint else [], data_root=dataset.root)

    def produce(todo: list[str]) -> Iterator[tuple[str, Entry]]:
        release_freed_memory = FreedMemoryReleaser()
        for image_id in todo:
            image = dataset.load_image(image_id)
            probs = predict_probs(model, image, settings, dev)
            yield image_id, label_from_probs(
                probs, image, settings.crf, renormalize=settings.procedure != "reference")
            release_freed_memory()

    return run.write(meta, produce)
