"""CAM artifact size: the reference's float32 `.npy` dicts against weaktr's storage, old and new.

For each image: the bytes of `np.save(dict(class -> float32 map))` (what hustvl/WeakTr's
`main.py --gen-attention-maps` writes per image), the bytes weaktr stored before (float16,
shuffle + gzip 4) and now (1/1024 steps as int16 row differences, shuffle + gzip 4,
`weaktr_cli/cam_codec.py`), and the largest absolute error of each against the float32 maps.

Sources: CAM-like maps at VOC size (a 14x14 and a 17x17 grid, as DeiT-S/16 gives at scales 1.0
and 1.2, each with its flip, up-sampled bilinearly and min-max normalised; 1-2 classes), and
any real artifacts given with --cams (their stored values are the reference then).

Run: python -m benchmarks.bench_cam_storage [--images 24] [--cams cams.h5 ...]
The committed record benchmarks/cam_storage.json is such a run (its "command" says which).
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from benchmarks.common import report
from weaktr_cli.cam_codec import decode_maps, encode_maps


def voc_like_cams(n: int, h: int = 375, w: int = 500) -> Iterator[np.ndarray]:
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    for _ in range(n):
        k = int(rng.integers(1, 3))
        total = torch.zeros(k, h, w)
        for grid_size in (14, 17):
            grid = torch.tensor(rng.random((1, k, grid_size, grid_size)) ** 3, dtype=torch.float32)
            for flip in (False, True):
                g = grid.flip(-1) if flip else grid
                up = F.interpolate(g, (h, w), mode="bilinear", align_corners=False)[0]
                total += up.flip(-1) if flip else up
        total -= total.amin((1, 2), keepdim=True)
        total /= total.amax((1, 2), keepdim=True)
        yield total.numpy()


def artifact_cams(path: Path, limit: int) -> Iterator[np.ndarray]:
    from weaktr_cli.artifacts import open_artifact

    with open_artifact(path, kind="cams") as reader:
        for image_id in reader.ids[:limit]:
            yield reader.read_cams(image_id).maps


def _npy_bytes(maps: np.ndarray) -> int:
    buffer = io.BytesIO()
    np.save(buffer, {c: m.astype(np.float32) for c, m in enumerate(maps)}, allow_pickle=True)
    return buffer.getbuffer().nbytes


def _stored(f: h5py.File, name: str, data: np.ndarray, attrs: dict) -> tuple[int, np.ndarray]:
    ds = f.create_dataset(name, data=data, compression="gzip", compression_opts=4, shuffle=True)
    for key, value in attrs.items():
        ds.attrs[key] = value
    return int(ds.id.get_storage_size()), decode_maps(ds[()], ds.attrs)


def measure(source: str, cams: Iterator[np.ndarray]) -> dict[str, object]:
    npy = old = new = 0
    old_err = new_err = 0.0
    count = 0
    with h5py.File(io.BytesIO(), "w") as f:
        for i, maps in enumerate(cams):
            if maps.size == 0:
                continue
            count += 1
            npy += _npy_bytes(maps)
            size, back = _stored(f, f"old{i}", maps.astype(np.float16), {})
            old, old_err = old + size, max(old_err, float(np.abs(back - maps).max()))
            size, back = _stored(f, f"new{i}", *encode_maps(maps))
            new, new_err = new + size, max(new_err, float(np.abs(back - maps).max()))
    return {"source": source, "images": count, "npy_kb_per_image": npy / count / 1e3,
            "float16_kb_per_image": old / count / 1e3, "new_kb_per_image": new / count / 1e3,
            "float16_x_smaller": npy / old, "new_x_smaller": npy / new,
            "float16_max_err": old_err, "new_max_err": new_err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--cams", type=Path, nargs="*", default=[])
    args = parser.parse_args()
    rows = [measure("VOC-size CAM-like maps", voc_like_cams(args.images))]
    rows += [measure(str(p), artifact_cams(p, args.images)) for p in args.cams]
    report("cam_storage", rows, {"target": "new_x_smaller >= 8 at new_max_err <= 1e-3"})


if __name__ == "__main__":
    main()
