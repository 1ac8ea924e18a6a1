"""evaluate throughput and memory: 500 synthetic 500x375 label maps, one core.

Measures the whole `evaluate_artifact` path (HDF5 read + ground truth + confusion matrix) and
the metric core alone, and compares peak RSS for 100 and 500 images (streaming: flat).
Run: python -m benchmarks.bench_evaluate
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from benchmarks.common import report

H, W, CLASSES = 375, 500, 21


class SyntheticMasks:
    """Deterministic blob masks generated on the fly (nothing held in memory)."""

    def __init__(self, n: int) -> None:
        from weaktr_cli.data.voc import VOC_CLASSES

        self.name, self.split, self.class_names = "voc", "train", VOC_CLASSES
        self.ids = [f"img{i:04d}" for i in range(n)]
        self.num_classes, self.has_masks = CLASSES, True

    def load_mask(self, image_id: str) -> np.ndarray:
        rng = np.random.default_rng(int(image_id[3:]))
        mask = np.zeros((H, W), np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, H - 100), rng.integers(0, W - 100)
            mask[y : y + 100, x : x + 120] = rng.integers(1, CLASSES)
        mask[::37] = 255
        return mask


def build_artifact(path: Path, dataset: SyntheticMasks) -> None:
    from weaktr_cli.artifacts import ArtifactWriter, new_meta

    meta = new_meta("labels", "voc", "train", dataset.class_names)
    with ArtifactWriter(path, meta) as writer:
        for image_id in dataset.ids:
            pred = dataset.load_mask(image_id).copy()
            pred[pred == 255] = 0
            pred[100:150] = 3  # a wrong band
            writer.write_labels(image_id, pred)
        writer.finalize()


def measure(n: int) -> dict[str, float]:
    from benchmarks.common import peak_rss_mb
    from weaktr_cli.artifacts import open_artifact
    from weaktr_cli.evaluation import evaluate_artifact
    from weaktr_cli.metrics import ConfusionMatrix

    dataset = SyntheticMasks(n)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "preds.h5"
        build_artifact(path, dataset)
        masks = [dataset.load_mask(i) for i in dataset.ids[:50]]
        rss_before = peak_rss_mb()
        start = time.perf_counter()
        with open_artifact(path) as reader:
            evaluate_artifact(reader, dataset)  # type: ignore[arg-type]
        elapsed = time.perf_counter() - start
        rss = peak_rss_mb()
    matrix = ConfusionMatrix(CLASSES)
    start = time.perf_counter()
    for mask in masks:
        matrix.update(mask, mask)
    core = len(masks) / (time.perf_counter() - start)
    return {"images": n, "images_per_s": n / elapsed, "core_images_per_s": core,
            "peak_rss_mb": rss, "rss_before_eval_mb": rss_before}


def main() -> None:
    if len(sys.argv) > 1:  # child: one measurement in a fresh process (clean peak RSS)
        import json

        print(json.dumps(measure(int(sys.argv[1]))))
        return
    rows = []
    for n in (100, 500):
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_evaluate", str(n)],
                             capture_output=True, text=True, check=True).stdout
        import json

        rows.append(json.loads(out.strip().splitlines()[-1]))
    for row in rows:
        row["eval_rss_increase_mb"] = row["peak_rss_mb"] - row.pop("rss_before_eval_mb")
    growth = rows[1]["eval_rss_increase_mb"] - rows[0]["eval_rss_increase_mb"]
    report("evaluate", rows, {"target_images_per_s": 500, "eval_rss_growth_mb": growth})
    print(f"memory used by evaluation, 100 -> 500 images: {growth:+.1f} MB")


if __name__ == "__main__":
    main()
