"""How `artifacts.py` stores CAM maps compactly: 1/1024 steps, as differences along each row.

CAMs are min-max normalised to [0, 1] and smooth (a patch grid up-sampled bilinearly), so
rounding them to multiples of 1/1024 keeps them within 2^-11 (the error float16 storage had),
and consecutive pixels of a row differ by a few steps: stored as int16 differences, shuffled
and gzipped, a map takes about a third of its float16 size (measured in
benchmarks/bench_cam_storage.py). Every multiple of 1/1024 in [0, 1] is exact in float16 and
float32, so decoding gives back exactly the rounded values.

Entries without the `scale` attribute (float16 or float32 data, as weaktr wrote before and as
third-party files may) are read as they are. docs/artifacts.md documents both forms.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Quantisation step: values are stored as round(x * STEPS) (int), read as int / STEPS.
STEPS = 1024
#: |x| beyond this would overflow the int16 differences: such maps are stored as float16.
_LIMIT = 15.0


def encode_maps(maps: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """(data, attrs) to store for float maps (K, H, W); `decode_maps(data, attrs)` inverts it
    to within 2^-11."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.size and float(np.abs(maps).max()) > _LIMIT:
        return maps.astype(np.float16), {}
    steps = np.rint(maps * STEPS).astype(np.int32)
    deltas = np.diff(steps, axis=-1, prepend=0).astype(np.int16)
    return deltas, {"scale": np.float32(1.0 / STEPS), "row_delta": np.int8(1)}


def decode_maps(data: np.ndarray, attrs: Any) -> np.ndarray:
    """float32 maps from a stored entry: `data` as read, `attrs` its HDF5 attributes."""
    if "scale" not in attrs:
        return np.asarray(data, dtype=np.float32)
    values = np.asarray(data, dtype=np.int32)
    if int(attrs.get("row_delta", 0)):
        values = np.cumsum(values, axis=-1, dtype=np.int32)
    decoded: np.ndarray = values.astype(np.float32) * np.float32(attrs["scale"])
    return decoded
