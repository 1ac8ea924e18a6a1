"""Phase 2: multi-scale + flip CAM inference over a split, streamed into a `cams` artifact.

Per image (METHOD.md Phase 2): for each scale, resize bicubic, run the image and its
horizontal flip, take the CAM variant, upsample bilinear to the original size, keep the
classes of the image-level label, un-flip, sum every pass, then min-max normalise each class
map to [0, 1]. Images of equal size are batched together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from weaktr_cli.artifacts import ArtifactWriter, file_sha256, new_meta
from weaktr_cli.data.base import SegmentationDataset
from weaktr_cli.data.loader import normalize, to_tensor
from weaktr_cli.errors import WeakTrError
from weaktr_cli.models.cam_vit import CAM_VARIANTS, WeakTrCAM, cam_maps
from weaktr_cli.runtime import (
    FreedMemoryReleaser,
    autocast,
    resolve_precision,
    select_device,
)
from weaktr_cli.shards import select_shard

NORM_EPS = 1e-5


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

    def check(self) -> None:
        if not self.scales or any(s <= 0 for s in self.scales):
            raise WeakTrError(f"invalid scales {self.scales}", hint="e.g. --scales 1.0,1.2")
        if not self.power > 0:
            raise WeakTrError(f"invalid CAM power {self.power}", hint="use a number > 0, e.g. 0.5")
        if self.variant not in CAM_VARIANTS:
            raise WeakTrError(f"unknown CAM variant {self.variant!r}",
                              hint=f"choose one of {', '.join(CAM_VARIANTS)}")


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each (H, W) map of a (K, H, W) tensor to [0, 1]."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    high = flat.max(dim=1).values[:, None, None]
    return ((maps - low) / (high - low + NORM_EPS)).clamp_(0, 1)


@torch.inference_mode()
def infer_cams(model: WeakTrCAM, images: torch.Tensor, class_ids: Sequence[np.ndarray],
               settings: CamSettings, device: torch.device, precision: str) -> list[np.ndarray]:
    """CAMs of a batch of equal-size images.

    images: (B, 3, H, W) uint8; class_ids[b]: int64 foreground ids present in image b.
    Returns per image a float32 (K_b, H, W) array in [0, 1], maps in class_ids order.
    """
    b, _, height, width = images.shape
    total = torch.zeros(b, model.num_classes, height, width, dtype=torch.float32, device=device)
    pixels = images.to(device).float()
    for scale in settings.scales:
        size = (max(round(height * scale), model.patch_size),
                max(round(width * scale), model.patch_size))
        scaled = pixels if size == (height, width) else F.interpolate(
            pixels, size=size, mode="bicubic", align_corners=False)
        batch = normalize(scaled.clamp(0, 255))
        if settings.flip:
            batch = torch.cat([batch, batch.flip(-1)])
        with autocast(device, precision):
            maps = cam_maps(model, batch, settings.variant)
        maps = F.interpolate(maps.float(), size=(height, width), mode="bilinear",
                             align_corners=False)
        total += maps[:b]
        if settings.flip:
            total += maps[b:].flip(-1)
    out = []
    for i, ids in enumerate(class_ids):
        present = total[i, torch.as_tensor(ids - 1, dtype=torch.long, device=device)]
        if not len(ids):
            out.append(np.zeros((0, height, width), np.float32))
            continue
        maps = normalise_maps(present)
        if settings.power != 1.0:
            maps = maps.pow_(settings.power)
        out.append(maps.cpu().numpy())
    return out


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
    dataset: SegmentationDataset,
    out_path: str | Path,
    *,
    settings: CamSettings = CamSettings(),
    device: str = "auto",
    shard: tuple[int, int] | None = None,
    resume: bool = True,
    checkpoint: str | Path | None = None,
    seed: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the CAMs of every image of `dataset` (or of one shard) to a `cams` artifact."""
    settings.check()
    if model.num_classes != dataset.num_classes - 1:
        raise WeakTrError(
            f"the CAM model has {model.num_classes} classes, dataset {dataset.name!r} has "
            f"{dataset.num_classes - 1} foreground classes",
            hint="use the checkpoint trained on this dataset",
        )
    dev = select_device(device)
    precision = resolve_precision(settings.precision, dev, training=False)
    model = model.to(dev).eval()
    config = {
        "scales": list(settings.scales), "flip": settings.flip, "variant": settings.variant,
        "power": settings.power, "precision": precision, "shard": list(shard) if shard else None,
        "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else None,
    }
    meta = new_meta("cams", dataset.name, dataset.split, dataset.class_names, seed=seed,
                    config=config, parents=[checkpoint] if checkpoint else [],
                    data_root=dataset.root)
    ids = select_shard(dataset.ids, shard)
    with ArtifactWriter(out_path, meta, resume=resume) as writer:
        todo = [i for i in ids if i not in writer.done_ids]
        release_freed_memory = FreedMemoryReleaser()
        done = len(ids) - len(todo)
        for batch in _batches(dataset, todo, settings.batch_size):
            images = torch.stack([to_tensor(image) for _, image in batch])
            labels = [dataset.image_labels(image_id) for image_id, _ in batch]
            for (image_id, _), ids_present, maps in zip(
                batch, labels, infer_cams(model, images, labels, settings, dev, precision),
                strict=True,
            ):
                writer.write_cams(image_id, ids_present, maps)
            release_freed_memory()
            done += len(batch)
            if progress:
                progress(done, len(ids))
        return writer.finalize()
