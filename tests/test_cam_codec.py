"""CAM storage: 1/1024 steps as row differences, within 2^-11, far smaller than float32."""

from __future__ import annotations

import io

import h5py
import numpy as np
import pytest

from weaktr_cli.cam_codec import STEPS, decode_maps, encode_maps


def _smooth_maps(rng: np.random.Generator, k: int, h: int, w: int) -> np.ndarray:
    """CAM-like maps: a coarse grid up-sampled bilinearly, min-max normalised per class."""
    grid = rng.random((k, 6, 8)) ** 3
    ys, xs = np.linspace(0, 5, h), np.linspace(0, 7, w)
    y0, x0 = np.minimum(ys.astype(int), 4), np.minimum(xs.astype(int), 6)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    g = grid[:, y0][:, :, x0], grid[:, y0 + 1][:, :, x0]
    g2 = grid[:, y0][:, :, x0 + 1], grid[:, y0 + 1][:, :, x0 + 1]
    maps = (g[0] * (1 - fy) + g[1] * fy) * (1 - fx) + (g2[0] * (1 - fy) + g2[1] * fy) * fx
    maps -= maps.min(axis=(1, 2), keepdims=True)
    maps /= maps.max(axis=(1, 2), keepdims=True)
    return maps.astype(np.float32)


def _stored_bytes(data: np.ndarray) -> int:
    with h5py.File(io.BytesIO(), "w") as f:  # the writer's filters (artifacts.py)
        ds = f.create_dataset("x", data=data, compression="gzip", compression_opts=4,
                              shuffle=True)
        return int(ds.id.get_storage_size())


def test_roundtrip_is_within_half_a_step_and_exact_on_steps() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((3, 17, 23)).astype(np.float32)
    data, attrs = encode_maps(maps)
    assert data.dtype == np.int16
    assert np.abs(decode_maps(data, attrs) - maps).max() <= 2.0**-11
    on_steps = np.round(maps * STEPS) / STEPS
    np.testing.assert_array_equal(decode_maps(*encode_maps(on_steps)), on_steps)


def test_smooth_cams_are_8x_smaller_than_float32() -> None:
    maps = _smooth_maps(np.random.default_rng(1), 2, 375, 500)
    data, _ = encode_maps(maps)
    assert maps.nbytes / _stored_bytes(data) >= 8
    # and well below the float16 storage weaktr used before
    assert _stored_bytes(data) < 0.6 * _stored_bytes(maps.astype(np.float16))


def test_entries_without_a_scale_read_as_they_are() -> None:
    """float16 (weaktr before the codec) and float32 entries of third-party files."""
    legacy = np.array([[[0.25, 0.5], [1.0, 0.0]]], dtype=np.float16)
    out = decode_maps(legacy, {})
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, legacy.astype(np.float32))


@pytest.mark.parametrize("shape", [(0, 4, 5), (1, 1, 1)])
def test_empty_and_single_pixel_maps(shape: tuple[int, int, int]) -> None:
    maps = np.full(shape, 0.3, np.float32)
    out = decode_maps(*encode_maps(maps))
    assert out.shape == shape
    assert np.abs(out - maps).max(initial=0.0) <= 2.0**-11


def test_values_far_outside_the_range_fall_back_to_float16() -> None:
    maps = np.array([[[100.0, -3.0]]], dtype=np.float32)
    data, attrs = encode_maps(maps)
    assert data.dtype == np.float16 and not attrs
    np.testing.assert_array_equal(decode_maps(data, attrs), maps)
