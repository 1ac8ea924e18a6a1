"""GPU throughput of the three heavy phases, with the model FLOPs utilisation they imply.

- train-cam: DeiT-S WeakTrCAM, 224 px, batch 64, AdamW step, bf16 autocast;
- retrain: ViT-S Segmenter, 480 px, batch 4, SGD step with the gradient clipping loss;
- dump-cams: DeiT-S fine CAMs at 500x375, scales 1.0 and 1.2 with flips, bf16.
FLOPs are counted once per step with torch's FlopCounterMode; MFU = achieved / peak, with the
peak given by --peak-tflops (H200 dense bf16: 989 by spec, ~790 measured for large matmuls).
Run by benchmarks/gpu.sh on a lent GPU machine; also runs (slowly) on CPU for a smoke check.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def timed(step: Callable[[], None], warmup: int, iters: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def flops_of(step: Callable[[], None]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def bench_train_cam(device: torch.device, batch: int, iters: int) -> dict[str, float]:
    from weaktr_cli.models.cam_vit import WeakTrCAM, cam_loss

    model = WeakTrCAM("deit-small", 20).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, 224, 224, device=device)
    targets = (torch.rand(batch, 20, device=device) > 0.8).float()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(images)
        loss, _ = cam_loss(out, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, 3, iters, device)
    return {"images_per_s": batch / seconds, "flops_per_step": flops_of(step),
            "step_s": seconds}


def bench_retrain(device: torch.device, batch: int, iters: int) -> dict[str, float]:
    from weaktr_cli.losses import gradient_clipping_loss
    from weaktr_cli.models.segmenter import build_segmenter

    model = build_segmenter(21, "vit-small", img_size=480).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, nesterov=True)
    images = torch.randn(batch, 3, 480, 480, device=device)
    target = torch.randint(0, 21, (batch, 480, 480), device=device)

    def step() -> None:
        logits = model(images)
        result = gradient_clipping_loss(logits.float(), target, tau=1.2, patch_size=120)
        result.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, 2, iters, device)
    return {"images_per_s": batch / seconds, "flops_per_step": flops_of(step),
            "step_s": seconds}


def bench_dump(device: torch.device, iters: int) -> dict[str, float]:
    import numpy as np

    from weaktr_cli.cams import CamSettings, infer_cams
    from weaktr_cli.models.cam_vit import WeakTrCAM

    model = WeakTrCAM("deit-small", 20).to(device).eval()
    image = torch.randint(0, 255, (1, 3, 375, 500), dtype=torch.uint8)
    labels = [np.array([3, 15])]
    settings = CamSettings(scales=(1.0, 1.2), flip=True, precision="bf16")

    def step() -> None:
        infer_cams(model, image, labels, settings, device, "bf16")

    seconds = timed(step, 2, iters, device)
    return {"images_per_s": 1 / seconds, "flops_per_step": flops_of(step), "step_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for name, run in (("train-cam (DeiT-S, 224, batch 64)", lambda: bench_train_cam(
                          device, 64, args.iters)),
                      ("retrain (ViT-S, 480, batch 4)", lambda: bench_retrain(
                          device, 4, args.iters)),
                      ("dump-cams (DeiT-S, 500x375, 2 scales + flip)", lambda: bench_dump(
                          device, args.iters))):
        result = run()
        achieved = result["flops_per_step"] / result["step_s"]
        result["tflops"] = achieved / 1e12
        result["mfu"] = achieved / (args.peak_tflops * 1e12)
        rows.append({"phase": name, **result})
        print(json.dumps(rows[-1]), flush=True)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu.json").write_text(json.dumps(
        {"benchmark": "gpu", "device": device_name, "torch": torch.__version__,
         "peak_tflops": args.peak_tflops, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
