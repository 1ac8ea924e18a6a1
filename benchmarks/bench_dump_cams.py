"""dump-cams on CPU: DeiT-S at VOC size (500x375, scales 1.0 and 1.2 with flips), fp32 and bf16.

Reports images/s, peak RSS, the bf16-vs-fp32 CAM difference, artifact bytes per image against
the reference's float32 pickled `.npy` dicts, the float16 storage error, and whether peak RSS
stays flat from 50 to 500 images (run with DeiT-Ti, patch 16, at the same image size, since 500
DeiT-S images take tens of minutes on 2 cores and a patch-8 model's 2,852 tokens are slower
still; the streaming path is the same).
Weights are random (no download here): speed and storage do not depend on them.

Run: python -m benchmarks.bench_dump_cams [--images 6]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import peak_rss_mb, report

H, W = 375, 500
CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
           "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
           "sheep", "sofa", "train", "tvmonitor")


class VocSizedImages:
    """Deterministic 500x375 images with 2 present classes each, made on the fly."""

    def __init__(self, n: int) -> None:
        self.name, self.split, self.class_names = "voc", "bench", CLASSES
        self.ids = [f"img{i:04d}" for i in range(n)]
        self.num_classes, self.has_masks = len(CLASSES), False

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: str) -> np.ndarray:
        rng = np.random.default_rng(int(image_id[3:]))
        xx = np.mgrid[0:H, 0:W][1]
        base = (np.sin(xx / (20 + rng.integers(20))) * 60 + 120).astype(np.uint8)
        image = np.stack([base, np.roll(base, 40, axis=1), base.T[:H, :W] if W <= H else base],
                         axis=2).copy()
        y, x = rng.integers(0, H - 150), rng.integers(0, W - 200)
        image[y : y + 150, x : x + 200] = rng.integers(0, 255, 3)
        return image

    def image_labels(self, image_id: str) -> np.ndarray:
        rng = np.random.default_rng(int(image_id[3:]) + 7)
        return np.sort(rng.choice(np.arange(1, 21), size=2, replace=False)).astype(np.int64)


def run_dump(arch: str, n: int, precision: str, out: Path) -> dict[str, float]:
    import torch

    from weaktr_cli.cams import CamSettings, dump_cams
    from weaktr_cli.models.cam_vit import WeakTrCAM
    from weaktr_cli.per_image import PerImageRun

    torch.manual_seed(0)
    model = WeakTrCAM(arch, 20)
    dataset = VocSizedImages(n)
    settings = CamSettings(scales=(1.0, 1.2), flip=True, variant="fine", precision=precision,
                           batch_size=1)
    start = time.perf_counter()
    run = PerImageRun(dataset, out, "cpu", resume=False)  # type: ignore[arg-type]
    dump_cams(model, run, settings=settings)
    elapsed = time.perf_counter() - start
    return {"images_per_s": n / elapsed, "peak_rss_mb": peak_rss_mb()}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(2)
    out = Path(args.out)
    print(json.dumps(run_dump(args.arch, args.images, args.precision, out)))


def spawn(arch: str, n: int, precision: str, out: Path) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_dump_cams", "--child", "--arch", arch,
         "--images", str(n), "--precision", precision, "--out", str(out)],
        capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def storage(fp32_path: Path, bf16_path: Path, n: int) -> dict[str, float]:
    """Artifact vs reference pickles; float16 error; bf16 vs fp32 CAM difference."""
    import torch

    from weaktr_cli.artifacts import open_artifact
    from weaktr_cli.cams import CamSettings, infer_cams
    from weaktr_cli.models.cam_vit import WeakTrCAM

    torch.manual_seed(0)
    model = WeakTrCAM("deit-small", 20).eval()
    dataset = VocSizedImages(n)
    pickle_bytes, max_err = 0, 0.0
    with open_artifact(fp32_path) as fp32, open_artifact(bf16_path) as bf16:
        bf16_diff = max(float(np.abs(fp32.read_cams(i).maps - bf16.read_cams(i).maps).max())
                        for i in fp32.ids)
        for image_id in fp32.ids[:2]:
            image = torch.from_numpy(dataset.load_image(image_id)).permute(2, 0, 1)[None]
            labels = dataset.image_labels(image_id)
            exact = infer_cams(model, image, [labels], CamSettings(), torch.device("cpu"),
                               "fp32")[0]
            max_err = max(max_err, float(np.abs(fp32.read_cams(image_id).maps - exact).max()))
        for image_id in fp32.ids:
            record = fp32.read_cams(image_id)
            # the reference: one float32 dict {class index: map} per image, np.save-pickled
            reference = {int(c) - 1: m.astype(np.float32) for c, m in
                         zip(record.class_ids, record.maps, strict=True)}
            pickle_bytes += len(pickle.dumps(reference, protocol=pickle.HIGHEST_PROTOCOL))
        ours = fp32_path.stat().st_size / len(fp32)
    reference_per_image = pickle_bytes / n
    return {"artifact_bytes_per_image": ours, "npy_bytes_per_image": reference_per_image,
            "size_ratio": reference_per_image / ours, "float16_max_abs_err": max_err,
            "bf16_vs_fp32_max_abs_diff": bf16_diff}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--arch", default="deit-small")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--out", default="")
    parser.add_argument("--skip-rss", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for precision in ("fp32", "bf16"):
            paths[precision] = Path(tmp) / f"{precision}.h5"
            result = spawn("deit-small", args.images, precision, paths[precision])
            rows.append({"model": "deit-small", "precision": precision, "images": args.images,
                         **result})
        extra = storage(paths["fp32"], paths["bf16"], args.images)
        if not args.skip_rss:
            for n in (50, 500):
                result = spawn("deit-tiny", n, "bf16", Path(tmp) / f"rss{n}.h5")
                rows.append({"model": "deit-tiny", "precision": "bf16", "images": n, **result})
            small, large = rows[-2]["peak_rss_mb"], rows[-1]["peak_rss_mb"]
            extra["rss_500_vs_50"] = large / small - 1
    report("dump_cams", rows, {**extra, "targets": {"size_ratio": 4.0,
                                                    "float16_max_abs_err": 1e-3,
                                                    "rss_500_vs_50": 0.05}})
    for key, value in extra.items():
        print(f"{key}: {value:.4g}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
