"""The retraining data: augmented (image, seed, ground truth) samples and their order.

Augmentation randomness comes from a generator seeded by (seed, epoch, image index) and the
sampling order from (seed, epoch), so a run is reproducible bit for bit on the CPU for a given
seed, world size and worker count, and a resumed run continues the same sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from weaktr_cli.data.base import IGNORE_INDEX, SegmentationDataset
from weaktr_cli.retrain.augment import augment
from weaktr_cli.retrain.seed_source import SeedSource
from weaktr_cli.settings import NORMALIZATIONS, RetrainConfig, resolve_normalization

__all__ = ["EpochSampler", "ItemError", "RetrainSamples", "collate_samples"]


class ItemError(NamedTuple):
    """A problem found while loading one sample in a worker, re-raised in the main process."""

    message: str
    hint: str | None


class RetrainSamples(Dataset[Any]):
    """Augmented (image, seed, ground truth) samples; indexed by (index, epoch) pairs.

    The ground truth is an all-255 map when the dataset has no masks.
    """

    def __init__(
        self,
        dataset: SegmentationDataset,
        ids: list[str],
        seeds: SeedSource,
        config: RetrainConfig,
        with_gt: bool,
    ) -> None:
        self.dataset = dataset
        self.ids = ids
        self.seeds = seeds
        self.config = config
        self.with_gt = with_gt
        mean, std = NORMALIZATIONS[resolve_normalization(config.normalization, config.arch)]
        self.mean, self.std = mean, std
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = (
            {} if config.cache_images else None
        )

    def __len__(self) -> int:
        return len(self.ids)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray] | ItemError:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        image_id = self.ids[index]
        image = self.dataset.load_image(image_id)
        seed = self.seeds.label(image_id)
        if seed.shape != image.shape[:2]:
            return ItemError(
                f"seeds of image {image_id!r} are {seed.shape[0]}x{seed.shape[1]} but the image "
                f"is {image.shape[0]}x{image.shape[1]} (HxW)",
                "the seeds were made from other images; pass the dataset they were made from",
            )
        gt = self.dataset.load_mask(image_id) if self.with_gt else None
        if gt is None or gt.shape != seed.shape:
            gt = np.full_like(seed, IGNORE_INDEX)
        item = (image, np.stack([seed, gt]))
        if self._cache is not None:
            self._cache[index] = item
        return item

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | ItemError:
        index, epoch = key
        loaded = self._load(index)
        if isinstance(loaded, ItemError):
            return loaded
        image, labels = loaded
        rng = np.random.default_rng([self.config.seed, epoch, index])
        return augment(image, labels, self.config, rng, self.mean, self.std)


def collate_samples(
    items: list[tuple[torch.Tensor, torch.Tensor] | ItemError],
) -> tuple[torch.Tensor, torch.Tensor] | ItemError:
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for item in items:
        if isinstance(item, ItemError):
            return item
        pairs.append(item)
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class EpochSampler(Sampler[tuple[int, int]]):
    """(index, epoch) keys of one rank's share of an epoch, from batch `start` on.

    The permutation depends only on (seed, epoch); the first steps_per_epoch x batch x world
    indices are dealt round-robin to the ranks (the rest of the epoch is dropped).
    """

    def __init__(self, n: int, seed: int, epoch: int, rank: int, world: int, batch: int,
                 steps_per_epoch: int, start: int) -> None:
        perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)
        mine = perm[: steps_per_epoch * batch * world][rank::world]
        self.keys = [(int(i), epoch) for i in mine[start * batch :]]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)
