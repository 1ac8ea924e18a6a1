"""Torch datasets over a `SegmentationDataset`: augmented image + multi-hot label for CAM
training, and plain normalised images for inference."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from weaktr_cli.data.base import SegmentationDataset
from weaktr_cli.settings import IMAGENET_MEAN, IMAGENET_STD

Transform = Callable[[torch.Tensor], torch.Tensor]


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


def normalize(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 normalised with ImageNet statistics."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (images.float() / 255.0 - m) / s


def cam_train_transform(size: int, *, crop_scale: tuple[float, float] = (0.08, 1.0),
                        randaugment: bool = True, random_erasing: float = 0.25) -> Transform:
    """The CAM training augmentation of docs/method.md on uint8 tensors: RandomResizedCrop, flip,
    RandAugment (magnitude 9), normalise, random erasing."""
    from torchvision.transforms import v2

    steps: list[Transform] = [
        v2.RandomResizedCrop(size, scale=crop_scale, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if randaugment:
        steps.append(v2.RandAugment(magnitude=9))
    steps.append(normalize)
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, value=0))
    return v2.Compose(steps)


class LabelledImages(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """(transformed image (3, S, S) float32, multi-hot label (C,) float32) pairs.

    With `cache=True` decoded images are kept in memory (the built-in dataset is ~50 MB), so
    epochs after the first skip PNG decoding.
    """

    def __init__(self, dataset: SegmentationDataset, transform: Transform,
                 cache: bool = False) -> None:
        self.dataset = dataset
        self.transform = transform
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None
        self._labels = [torch.from_numpy(dataset.label_vector(i)) for i in dataset.ids]

    def __len__(self) -> int:
        return len(self.dataset)

    def image(self, index: int) -> torch.Tensor:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        tensor = to_tensor(self.dataset.load_image(self.dataset.ids[index]))
        if self._cache is not None:
            self._cache[index] = tensor
        return tensor

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.image(index)), self._labels[index]
