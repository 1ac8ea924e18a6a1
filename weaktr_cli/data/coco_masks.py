"""COCO `segmentation` fields to pixel masks, without pycocotools.

Polygons are rasterised with COCO's own convention (a pixel is inside when its centre is), so
pixel counts match the annotations' `area`; RLE comes compressed (pycocotools' string format)
or as a plain list of run lengths. `CocoDataset.rasterize` paints these masks into label maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def rle_string_to_counts(counts: str | bytes) -> list[int]:
    """Run lengths of a COCO compressed RLE string (pycocotools' `rleFrString` format).

    Each count is stored as 5-bit groups in characters offset by 48, bit 0x20 meaning "more
    groups follow"; from the fourth count on, the value is a delta to the count two back.
    """
    data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    out: list[int] = []
    pos = 0
    while pos < len(data):
        value = 0
        shift = 0
        more = True
        while more:
            if pos >= len(data):
                raise ValueError("compressed RLE string ends inside a count")
            c = data[pos] - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and (c & 0x10):
                value -= 1 << shift  # sign-extend the last group
        if len(out) > 2:
            value += out[-2]
        out.append(value)
    return out


def decode_rle(counts: str | bytes | Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Decode a COCO RLE to an (H, W) bool mask; `size` is [H, W].

    `counts` is either the compressed string or the uncompressed list of run lengths, runs
    alternating 0, 1, 0, ... over the pixels in column-major (Fortran) order.
    """
    height, width = int(size[0]), int(size[1])
    runs = rle_string_to_counts(counts) if isinstance(counts, str | bytes) else list(counts)
    lengths = np.asarray(runs, dtype=np.int64)
    if lengths.size and lengths.min() < 0:
        raise ValueError("RLE has a negative run length")
    if int(lengths.sum()) != height * width:
        total = int(lengths.sum())
        raise ValueError(f"RLE covers {total} pixels, a {height}x{width} mask has {height * width}")
    values = np.arange(lengths.size) % 2 == 1
    flat = np.repeat(values, lengths)
    return flat.reshape((height, width), order="F")


def polygon_to_mask(polygon: Sequence[float] | np.ndarray, height: int, width: int) -> np.ndarray:
    """Rasterise one polygon [x0, y0, x1, y1, ...] to an (H, W) bool mask.

    A pixel is inside when its centre (x + 0.5, y + 0.5) is (even-odd rule), the convention of
    COCO's own rasteriser, so the pixel count matches the annotation's `area`.
    """
    mask = np.zeros((height, width), dtype=bool)
    xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    if xy.shape[0] < 3 or height == 0 or width == 0:
        return mask
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    row_lo = max(0, int(np.floor(y0.min() - 0.5)))
    row_hi = min(height, int(np.ceil(y0.max() + 0.5)) + 1)
    if row_lo >= row_hi:
        return mask
    yc = (np.arange(row_lo, row_hi, dtype=np.float64) + 0.5)[:, None]  # (R, 1) row centres
    # Half-open test so a vertex on a scanline is counted once, horizontal edges never.
    crosses = (np.minimum(y0, y1) <= yc) & (yc < np.maximum(y0, y1))  # (R, E)
    rows, edges = np.nonzero(crosses)
    dy = y1[edges] - y0[edges]
    xc = x0[edges] + (yc[rows, 0] - y0[edges]) * (x1[edges] - x0[edges]) / dy
    # The first pixel whose centre is right of the crossing; parity of crossings to the left of
    # a pixel centre (a cumulative sum of toggles) says whether it is inside.
    start = np.clip(np.ceil(xc - 0.5), 0, width).astype(np.int64)
    toggles = np.zeros((row_hi - row_lo, width + 1), dtype=np.int32)
    np.add.at(toggles, (rows, start), 1)
    mask[row_lo:row_hi] = (np.cumsum(toggles, axis=1)[:, :width] % 2).astype(bool)
    return mask


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of a COCO `segmentation`: a list of polygons (union) or an RLE dict."""
    if isinstance(segmentation, dict):
        size = segmentation.get("size", [height, width])
        if [int(size[0]), int(size[1])] != [height, width]:
            raise ValueError(f"RLE size {list(size)} differs from the image size {height}x{width}")
        return decode_rle(segmentation["counts"], size)
    mask = np.zeros((height, width), dtype=bool)
    for polygon in segmentation:
        mask |= polygon_to_mask(polygon, height, width)
    return mask
