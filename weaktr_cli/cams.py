"""Phase 2: multi-scale + flip CAM inference over a split, streamed into a `cams` artifact.

Per image (docs/method.md, phase 2): for each scale, resize bicubic, run the image and its
horizontal flip, take the CAM variant, upsample bilinear to the original size, keep the
classes of the image-level label, un-flip, sum every pass, then min-max normalise each class
map to [0, 1]. Images of equal size are batched together.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from weaktr_cli.artifacts import CamRecord, Entry, file_sha256, new_meta
from weaktr_cli.data.align import check_class_names
from weaktr_cli.data.base import SegmentationDataset
from weaktr_cli.data.loader import normalize, to_tensor
from weaktr_cli.errors import WeakTrError
from weaktr_cli.models.cam_vit import WeakTrCAM, cam_maps
from weaktr_cli.per_image import PerImageRun
from weaktr_cli.runtime import (
    FreedMemoryReleaser,
    autocast,
    resolve_precision,
    select_device,
)
from weaktr_cli.settings import CamSettings

NORM_EPS = 1e-5


def normalize_maps(maps: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Min-max normalise each (H, W) map of a (K, H, W) tensor to [0, 1]: (m - min) /
    (max - min + eps). weaktr's eps is 1e-5; the reference's 1e-8 (engine.py:209-210), which
    matters for maps whose range is small (an untrained model's: maxima 0.01-0.14 with 1e-5)."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    high = flat.max(dim=1).values[:, None, None]
    return ((maps - low) / (high - low + eps)).clamp_(0, 1)


def inference_scale(height: int, width: int, max_size: int | None) -> float:
    """The factor that brings the longer side down to `max_size` (1.0 when it fits or None)."""
    if not max_size or max(height, width) <= max_size:
        return 1.0
    return max_size / max(height, width)


@torch.inference_mode()
def infer_cams(model: WeakTrCAM, images: torch.Tensor, class_ids: Sequence[np.ndarray],
               settings: CamSettings, device: torch.device, precision: str) -> list[np.ndarray]:
    """CAMs of a batch of equal-size images.

    images: (B, 3, H, W) uint8; class_ids[b]: int64 foreground ids present in image b.
    Returns per image a float32 (K_b, H, W) array in [0, 1], maps in class_ids order.

    Memory is bounded per image: the model sees at most `settings.max_size` pixels on the long
    side (times each scale), and only the K_b present classes are upsampled to full size, one
    class map at a time, so a 6000 x 4000 photo costs K_b full-size maps, not C of them per
    pass (C x H x W float32 is 1.9 GB for VOC's 20 classes at that size).
    """
    b, _, height, width = images.shape
    index = [torch.as_tensor(ids - 1, dtype=torch.long, device=device) for ids in class_ids]
    totals = [torch.zeros(len(ids), height, width, dtype=torch.float32, device=device)
              for ids in class_ids]
    pixels = images.to(device).float()
    base = inference_scale(height, width, settings.max_size)
    for scale in settings.scales:
        size = (max(round(height * scale * base), model.patch_size),
                max(round(width * scale * base), model.patch_size))
        scaled = pixels if size == (height, width) else F.interpolate(
            pixels, size=size, mode="bicubic", align_corners=False)
        batch = normalize(scaled.clamp(0, 255))
        if settings.flip:
            batch = torch.cat([batch, batch.flip(-1)])
        with autocast(device, precision):
            maps = cam_maps(model, batch, settings.variant)
        for i in range(b):
            _add_full_size(totals[i], maps[i, index[i]], flipped=False)
            if settings.flip:
                _add_full_size(totals[i], maps[b + i, index[i]], flipped=True)
    out = []
    for total in totals:
        maps = normalize_maps(total, settings.minmax_eps) if len(total) else total
        if settings.power != 1.0:
            maps = maps.pow_(settings.power)
        out.append(maps.cpu().numpy())
    return out


def _add_full_size(total: torch.Tensor, maps: torch.Tensor, *, flipped: bool) -> None:
    """total (K, H, W) += maps (K, h, w) upsampled bilinear (un-flipped), one class at a time."""
    for k in range(maps.shape[0]):
        full = F.interpolate(maps[k][None, None].float(), size=total.shape[-2:],
                             mode="bilinear", align_corners=False)[0, 0]
        total[k] += full.flip(-1) if flipped else full


def _infer_or_explain(model: WeakTrCAM, images: torch.Tensor, labels: list[np.ndarray],
                      settings: CamSettings, device: torch.device, precision: str,
                      first_id: str) -> list[np.ndarray]:
    """`infer_cams`, with running out of memory said as what to change."""
    try:
        return infer_cams(model, images, labels, settings, device, precision)
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(exc, MemoryError) and not _is_out_of_memory(exc):
            raise
        _, _, height, width = images.shape
        raise WeakTrError(
            f"out of memory computing the CAMs of {first_id} ({width}x{height}, "
            f"{len(images)} image(s) in the batch, max size {settings.max_size})",
            hint="lower --max-size or --batch-size, pass fewer --scales, or resize the photos",
        ) from None


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate" in text or "failed to allocate" in text


def _batches(dataset: SegmentationDataset, ids: Sequence[str], batch_size: int
             ) -> Iterator[list[tuple[str, np.ndarray]]]:
    """Consecutive images of equal size, up to batch_size at a time, in id order."""
    batch: list[tuple[str, np.ndarray]] = []
    for image_id in ids:
        image = dataset.load_image(image_id)
        if batch and (len(batch) == batch_size or batch[0][1].shape != image.shape):
            yield batch
            batch = []
        batch.append((image_id, image))
    if batch:
        yield batch


def dump_cams(
    model: WeakTrCAM,
    run: PerImageRun,
    *,
    settings: CamSettings = CamSettings(),
    checkpoint: str | Path | None = None,
    seed: int | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write the CAMs of every image of `run.dataset` (or of `run`'s shard) to a `cams`
    artifact at `run.out_path`; returns the final artifact path.

    `run`: the split and the artifact path, device, shard, resume and progress
    (`PerImageRun`). `class_names`: the classes the model was trained on (its checkpoint's,
    background first), checked against the dataset's; None checks the count only (official
    checkpoints record no names).
    """
    settings.check()
    dataset = run.dataset
    if class_names is not None:
        check_class_names(f"the CAM model{f' {checkpoint}' if checkpoint else ''}",
                          class_names, dataset, hint="use the checkpoint trained on this dataset")
    if model.num_classes != dataset.num_classes - 1:
        raise WeakTrError(
            f"the CAM model has {model.num_classes} classes, dataset {dataset.name!r} has "
            f"{dataset.num_classes - 1} foreground classes",
            hint="use the checkpoint trained on this dataset",
        )
    dev = select_device(run.device)
    precision = resolve_precision(settings.precision, dev, training=False)
    model = model.to(dev).eval()
    config = {
        "scales": list(settings.scales), "flip": settings.flip, "variant": settings.variant,
        "power": settings.power, "max_size": settings.max_size, "precision": precision,
        **run.config(),
        "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else None,
    }
    meta = new_meta("cams", dataset.name, dataset.split, dataset.class_names, seed=seed,
                    config=config, parents=[checkpoint] if checkpoint else [],
                    data_root=dataset.root)

    def produce(todo: list[str]) -> Iterator[tuple[str, Entry]]:
        release_freed_memory = FreedMemoryReleaser()
        for batch in _batches(dataset, todo, settings.batch_size):
            images = torch.stack([to_tensor(image) for _, image in batch])
            labels = [dataset.image_labels(image_id) for image_id, _ in batch]
            for (image_id, _), ids_present, maps in zip(
                batch, labels, _infer_or_explain(model, images, labels, settings, dev, precision,
                                                 batch[0][0]),
                strict=True,
            ):
                yield image_id, CamRecord(class_ids=ids_present, maps=maps)
            release_freed_memory()

    return run.write(meta, produce)
