"""Dense-CRF seed throughput through `make_seeds` with 1 and 2 workers (VOC preset, 500x375).

    python benchmarks/bench_crf.py [--images 20] [--repeat 1]

Synthetic images with structure (a gradient, 2-3 coloured ellipses/boxes, noise) and one
smooth, off-centre CAM blob per object. Reports images/s with the spawn pool's start-up
included (the wall time a user sees) and excluded (start-up timed separately: spawning the
workers, importing weaktr, opening the CAM file, unpickling the dataset). Prints a table and
writes benchmarks/out/crf.json. The target is >= 1.8x with 2 workers on 2 free cores; the
cpu/wall column (CPU seconds of this process and its workers per wall second) shows whether the
cores were free: near 1.0 and 2.0 when they were, lower when other processes took turns.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from weaktr_cli import seeds  # noqa: E402
from weaktr_cli.artifacts import ArtifactWriter, new_meta, open_artifact  # noqa: E402
from weaktr_cli.data.base import UnmaskedDataset  # noqa: E402
from weaktr_cli.dense_crf import get_preset  # noqa: E402

H, W = 375, 500
CLASS_NAMES = ("background", *(f"class{i}" for i in range(1, 21)))
BG = 0.43


class SynthDataset(UnmaskedDataset):
    """Images generated from the id (cheap to pickle into spawn workers)."""

    name = "synth"

    def __init__(self, n: int) -> None:
        self.split = "bench"
        self.class_names = CLASS_NAMES
        self.ids = [f"synth{i:03d}" for i in range(n)]

    def objects(self, image_id: str) -> list[tuple[int, float, float, float, float]]:
        """[(class_id, cy, cx, ry, rx)] for 2-3 objects."""
        rng = np.random.default_rng([7, self.ids.index(image_id)])
        k = int(rng.integers(2, 4))
        classes = np.sort(rng.choice(np.arange(1, 21), size=k, replace=False))
        return [
            (
                int(c),
                float(rng.uniform(80, H - 80)),
                float(rng.uniform(80 + i * 120, 200 + i * 120)),
                float(rng.uniform(40, 90)),
                float(rng.uniform(40, 80)),
            )
            for i, c in enumerate(classes)
        ]

    def load_image(self, image_id: str) -> np.ndarray:
        rng = np.random.default_rng([7, self.ids.index(image_id), 1])
        y, x = np.mgrid[0:H, 0:W].astype(np.float32)
        img = np.stack([60 + 0.2 * x, 80 + 0.2 * y, 120 + 0.1 * (x - y)], axis=-1)
        for cls, cy, cx, ry, rx in self.objects(image_id):
            inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
            if cls % 2:  # boxes for odd ids: sharp straight edges
                inside = (abs(y - cy) <= ry) & (abs(x - cx) <= rx)
            img[inside] = [(37 * cls) % 256, (91 * cls) % 256, (53 * cls + 90) % 256]
        img += rng.normal(0, 10, size=img.shape)
        return np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))

    def image_labels(self, image_id: str) -> np.ndarray:
        return np.array(sorted(c for c, *_ in self.objects(image_id)), dtype=np.int64)


def write_cams(path: Path, data: SynthDataset) -> Path:
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    meta = new_meta("cams", data.name, data.split, data.class_names)
    with ArtifactWriter(path, meta, resume=False) as writer:
        for image_id in data.ids:
            objs = data.objects(image_id)
            maps = np.stack(
                [
                    np.exp(-(((y - cy - 15) / (1.3 * ry)) ** 2 + ((x - cx + 10) / (1.3 * rx)) ** 2))
                    for _, cy, cx, ry, rx in objs
                ]
            )
            writer.write_cams(image_id, np.array([o[0] for o in objs]), maps)
        return writer.finalize()


def _ready(_: int) -> int:
    time.sleep(0.2)  # hold each worker so both take one task: both have initialised
    return os.getpid()


def pool_startup(cams: Path, data: SynthDataset, workers: int) -> float:
    """Seconds to spawn `workers` workers with make_seeds' initializer, all initialised."""
    options = {"bg": BG, "params": get_preset("voc"), "unary": "hard", "mark_disagreement": False}
    ctx = multiprocessing.get_context("spawn")
    start = time.perf_counter()
    pool = ctx.Pool(workers, initializer=seeds._init_worker, initargs=(str(cams), data, options))
    try:
        pids = pool.map(_ready, range(workers), chunksize=1)
        elapsed = time.perf_counter() - start - 0.2
    finally:
        pool.close()
        pool.join()
    if len(set(pids)) != workers:
        raise RuntimeError(f"only {len(set(pids))} of {workers} workers took a task")
    return elapsed


def _cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the pool workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run(cams: Path, data: SynthDataset, out: Path, workers: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one make_seeds run."""
    if out.exists():
        out.unlink()
    cpu, start = _cpu_seconds(), time.perf_counter()
    seeds.make_seeds(
        cams, data, out, bg=BG, params=get_preset("voc"), workers=workers, resume=False
    )
    return time.perf_counter() - start, _cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=1, help="runs per setting; best is kept")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "crf.json")
    args = parser.parse_args()

    load_before = os.getloadavg()
    data = SynthDataset(args.images)
    results: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        cams = write_cams(tmp_path / "cams.h5", data)
        outputs = {}
        for workers in (1, 2):
            best, cpu = min(
                run(cams, data, tmp_path / f"seeds{workers}.h5", workers)
                for _ in range(args.repeat)
            )
            startup = (
                min(pool_startup(cams, data, workers) for _ in range(args.repeat))
                if workers > 1
                else 0.0
            )
            outputs[workers] = tmp_path / f"seeds{workers}.h5"
            results[workers] = {
                "seconds": best,
                "startup_seconds": startup,
                "images_per_s": args.images / best,
                "images_per_s_excl_startup": args.images / (best - startup),
                # CPU seconds per wall second: about `workers` when the cores were free for us.
                "cpu_utilisation": cpu / best,
            }
        with open_artifact(outputs[1]) as a, open_artifact(outputs[2]) as b:
            identical = all(np.array_equal(a.read_labels(i), b.read_labels(i)) for i in a.ids)
    load_after = os.getloadavg()

    speedup = results[2]["images_per_s"] / results[1]["images_per_s"]
    speedup_excl = results[2]["images_per_s_excl_startup"] / results[1]["images_per_s"]
    print(f"dense CRF seeds, VOC preset, {args.images} images {W}x{H}, 2-3 classes each")
    header = ("workers", "seconds", "img/s", "startup s", "img/s excl.", "cpu/wall")
    print(" ".join(f"{h:>11}" for h in header))
    for workers, r in results.items():
        keys = ("seconds", "images_per_s", "startup_seconds", "images_per_s_excl_startup")
        cells = [r[k] for k in (*keys, "cpu_utilisation")]
        print(f"{workers:>11} " + " ".join(f"{c:>11.2f}" for c in cells))
    print(f"speed-up with 2 workers: {speedup:.2f}x incl. start-up, {speedup_excl:.2f}x excl.")
    print(
        f"outputs identical: {identical}; load average before {load_before[0]:.2f}, "
        f"after {load_after[0]:.2f} on {os.cpu_count()} CPUs"
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "crf_seeds",
        "preset": "voc",
        "image_size": [H, W],
        "images": args.images,
        "repeat": args.repeat,
        "results": {str(k): v for k, v in results.items()},
        "speedup_2_workers": speedup,
        "speedup_2_workers_excl_startup": speedup_excl,
        "outputs_identical": identical,
        "loadavg_before": list(load_before),
        "loadavg_after": list(load_after),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
