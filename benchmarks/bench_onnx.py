"""Per-image latency PyTorch vs onnxruntime (CPU) and the exported models' logit differences.

    python benchmarks/bench_onnx.py [--threads 2] [--iters 5] [--size 480] [--skip-deit]

Random-weight segmenters (21 classes, 2 decoder layers): the CPU-sized `tiny-p8` backbone and
a DeiT-S-shaped one (`deit-small`: patch 16, dim 384, depth 12), each exported fixed at
1 x 3 x SIZE x SIZE (the deployment shape) and dynamic (batch / H / W free). Latency is one
480 x 480 image per forward, median of `--iters` runs after one warm-up, PyTorch under
`inference_mode` and onnxruntime (CPU provider) with the same thread count. The logit
differences are `export_onnx`'s own checks (seeded 0-255 pixels; dynamic exports also at
another batch and size). A DeiT-S-shaped CAM model (20 classes, 224 px) is exported dynamic
too, for its CAM differences. Prints a table and writes benchmarks/out/onnx.json; the cpu/wall
column (process CPU seconds per wall second while timing) shows whether the cores were free.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.common import report  # noqa: E402
from weaktr_cli.export import ExportReport, export_onnx  # noqa: E402
from weaktr_cli.models.cam_vit import WeakTrCAM  # noqa: E402
from weaktr_cli.models.segmenter import build_segmenter  # noqa: E402
from weaktr_cli.onnx_infer import OnnxSegmenter  # noqa: E402

N_CLS = 21
NAMES = ("background", *(f"class{i}" for i in range(1, N_CLS)))


def _timed(fn: Any, iters: int) -> tuple[float, float]:
    """(median seconds per call after one warm-up, process CPU seconds per wall second)."""
    fn()
    times = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return statistics.median(times), cpu / wall


def bench_segmenter(arch: str, size: int, threads: int, iters: int, out_dir: Path) -> list[dict]:
    torch.manual_seed(0)
    crop = 96 if arch == "tiny-p8" else 480
    model = build_segmenter(N_CLS, arch, img_size=crop).eval()
    pixels = np.random.default_rng(0).integers(0, 256, (1, 3, size, size)).astype(np.float32)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)

    def run_torch() -> None:
        with torch.inference_mode():
            model((torch.from_numpy(pixels) / 255.0 - mean) / std)

    torch_s, torch_cpu = _timed(run_torch, iters)
    rows = []
    for dynamic in (False, True):
        path = out_dir / f"{arch}-{'dynamic' if dynamic else 'fixed'}.onnx"
        rep = export_onnx(model, path, kind="segmenter", class_names=NAMES, height=size,
                          width=size, dynamic=dynamic)
        seg = OnnxSegmenter(path, threads=threads)
        onnx_s, onnx_cpu = _timed(lambda seg=seg: seg.run(pixels), iters)
        rows.append({
            "model": f"segmenter {arch}",
            "export": "dynamic" if dynamic else "fixed",
            "input": f"1x3x{size}x{size}",
            "torch_ms": 1000 * torch_s,
            "onnx_ms": 1000 * onnx_s,
            "speedup": torch_s / onnx_s,
            **_export_figures(rep),
            "cpu_per_wall": min(torch_cpu, onnx_cpu),
        })
        print(f"  {arch} {rows[-1]['export']}: torch {1000 * torch_s:.0f} ms, "
              f"onnx {1000 * onnx_s:.0f} ms, diff {rep.max_abs_diff:.2g}", file=sys.stderr)
    return rows


def _export_figures(rep: ExportReport) -> dict:
    """A row's figures of one export: its check against PyTorch, times and file size."""
    return {
        "max_abs_diff": rep.max_abs_diff,
        "max_abs_logit": max(c.max_abs_ref for c in rep.checks),
        "checked_shapes": " ".join("x".join(map(str, c.shape)) for c in rep.checks),
        "export_s": rep.export_seconds,
        "verify_s": rep.verify_seconds,
        "onnx_mb": rep.file_bytes / 2**20,
    }


def bench_cam(out_dir: Path) -> dict:
    torch.manual_seed(0)
    model = WeakTrCAM("deit-small", N_CLS - 1).eval()
    rep = export_onnx(model, out_dir / "cam.onnx", kind="cam", class_names=NAMES, dynamic=True)
    return {
        "model": "cam deit-small (fine)",
        "export": "dynamic",
        "input": "1x3x224x224",
        **_export_figures(rep),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--size", type=int, default=480)
    parser.add_argument("--skip-deit", action="store_true", help="only the CPU-sized model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        archs = ["tiny-p8"] if args.skip_deit else ["tiny-p8", "deit-small"]
        for arch in archs:
            rows += bench_segmenter(arch, args.size, args.threads, args.iters, Path(tmp))
        if not args.skip_deit:
            rows.append(bench_cam(Path(tmp)))
    import onnxruntime

    report("onnx", rows, {
        "threads": args.threads,
        "iters": args.iters,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    })


if __name__ == "__main__":
    main()
