"""The analysis behind benchmarks/clip_study.py: which images pair two shapes of one colour,
and how much of the wrong seeds a model memorised."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from benchmarks.clip_study import memorisation, pair_images, parse_setting

NAMES = ("background", "red-circle", "red-square", "blue-circle", "blue-square")


class FakeDataset:
    class_names = NAMES

    def __init__(self, labels: dict[str, list[int]], masks: dict[str, np.ndarray]) -> None:
        self.ids = list(labels)
        self._labels, self._masks = labels, masks

    def image_labels(self, image_id: str) -> np.ndarray:
        return np.array(self._labels[image_id])

    def load_mask(self, image_id: str) -> np.ndarray:
        return self._masks[image_id]


class FakeLabels:
    def __init__(self, maps: dict[str, np.ndarray]) -> None:
        self._maps = maps

    def read_labels(self, image_id: str) -> np.ndarray:
        return self._maps[image_id]


def test_pair_images_are_those_with_two_shapes_of_one_colour() -> None:
    labels = {"a": [1, 2], "b": [1, 3], "c": [3, 4, 1], "d": [2], "e": [2, 4]}
    dataset = FakeDataset(labels, {})
    assert pair_images(dataset) == ["a", "c"]


def test_memorisation_counts_only_wrong_seed_pixels_with_ground_truth() -> None:
    truth = np.array([[1, 1, 2, 2, 255, 0]], np.uint8)
    seed = np.array([[2, 2, 2, 1, 1, 255]], np.uint8)  # wrong at 0, 1, 3; 4 and 5 don't count
    pred = np.array([[2, 1, 0, 1, 1, 0]], np.uint8)  # 0: as seed, 1: as truth, 3: as seed
    dataset = FakeDataset({"x": [1, 2]}, {"x": truth})
    shares = memorisation(dataset, FakeLabels({"x": seed}), FakeLabels({"x": pred}), ["x"])
    assert shares == pytest.approx({"memorised": 2 / 3, "corrected": 1 / 3})


def test_settings_parse_and_bad_ones_are_refused() -> None:
    assert parse_setting("noclip") == {"clip": False}
    assert parse_setting("clip:0.3:24") == {"clip": True, "tau": "auto",
                                            "tau_auto_fraction": 0.3, "clip_patch": 24}
    with pytest.raises(argparse.ArgumentTypeError):
        parse_setting("clip:0.3")
