"""The numbers behind CAM selection and the CAM dump: `average_precision` (drives
`--select val-map`) and `normalize_maps` (every dumped CAM), on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from weaktr_cli.cams import NORM_EPS, normalize_maps
from weaktr_cli.train_cam import average_precision


def test_average_precision_by_hand() -> None:
    scores = np.array([[0.9, 0.5, 0.2],
                       [0.8, 0.5, 0.4],
                       [0.3, 0.5, 0.6],
                       [0.1, 0.5, 0.8]])
    targets = np.array([[1, 0, 0],
                        [0, 0, 0],
                        [1, 0, 0],
                        [0, 0, 1]])
    # class 0, ranked 0.9 (hit), 0.8, 0.3 (hit), 0.1: precision at the hits 1/1 and 2/3;
    # class 1 has no positive image and is left out; class 2's one positive ranks first.
    expected = ((1 + 2 / 3) / 2 + 1.0) / 2
    assert average_precision(scores, targets) == pytest.approx(expected, abs=1e-12)


def test_average_precision_ranks_ties_in_image_order_and_ignores_scale() -> None:
    targets = np.array([[0], [1], [1]])
    tied = np.array([[0.5], [0.5], [0.5]])
    # equal scores keep image order: the first image (a miss) ranks first -> (1/2 + 2/3) / 2
    assert average_precision(tied, targets) == pytest.approx((1 / 2 + 2 / 3) / 2)
    perfect = np.array([[0.1], [0.7], [0.9]])
    assert average_precision(perfect, targets) == 1.0
    assert average_precision(perfect * 1000 - 3, targets) == 1.0  # ranks only
    assert math.isnan(average_precision(perfect, np.zeros_like(targets)))


def test_normalize_maps_per_map_min_max() -> None:
    first = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 1.0  # 1..6
    flat = torch.full((2, 3), 3.0)
    negative = -torch.arange(6, dtype=torch.float32).reshape(2, 3) * 10  # 0..-50
    out = normalize_maps(torch.stack([first, flat, negative]))
    assert out.shape == (3, 2, 3) and out.dtype == torch.float32
    # each map on its own range: (x - min) / (max - min + eps)
    torch.testing.assert_close(out[0], (first - 1) / (5 + NORM_EPS), rtol=0, atol=1e-7)
    assert torch.equal(out[1], torch.zeros(2, 3))  # a constant map has nothing to show
    torch.testing.assert_close(out[2], (negative + 50) / (50 + NORM_EPS), rtol=0, atol=1e-7)
    assert out.min() == 0.0 and out.max() < 1.0 and out[0].max() > 1 - 1e-5
