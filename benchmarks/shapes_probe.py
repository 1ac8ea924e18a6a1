"""Learnability probe for the `shapes` dataset: can a tiny ViT trained from scratch on CPU, from
image-level labels only, localise the classes with a CAM?

Trains a timm ViT (no pretraining) whose patch tokens feed a 3x3 conv CAM head; the loss is
multi-label soft margin on the globally averaged CAM (the WeakTr "coarse CAM" branch). Every
`--eval-every` seconds it reports classification mAP and CAM mIoU on the first `--eval-images`
train images (present classes only, max-normalised per class, background threshold swept as in
CAM evaluation). This is a dataset probe, not the project's CAM model.

    python benchmarks/shapes_probe.py --minutes 5 --threads 2      # wall-clock budget
    python benchmarks/shapes_probe.py --steps 270 --threads 1      # load-independent budget

Measured on the default dataset (patch 8, dim 128, depth 4, batch 64, 270 steps = 17k images,
about 4 min at the 69 img/s measured for this model on 2 threads): CAM mIoU 67.9,
mAP 66.1. A perfect CAM at the 12x12 patch grid, bilinearly up-sampled, would score 96.3 (200
images), so the CAMs are far from perfect.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from weaktr_cli.data.shapes import ShapesConfig, open_shapes

THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)


class ProbeCam(nn.Module):
    """ViT patch tokens -> (B, K, h, w) CAM logits; GAP of the CAM gives class scores."""

    def __init__(self, image_size: int, patch: int, dim: int, depth: int, k: int) -> None:
        super().__init__()
        self.vit = VisionTransformer(
            img_size=image_size,
            patch_size=patch,
            embed_dim=dim,
            depth=depth,
            num_heads=max(1, dim // 64),
            num_classes=0,
            global_pool="",
        )
        self.grid = image_size // patch
        self.head = nn.Conv2d(dim, k, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens :]
        b, _, d = tokens.shape
        fmap = tokens.transpose(1, 2).reshape(b, d, self.grid, self.grid)
        return self.head(fmap)


def load_split(ds, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(N,3,H,W) float images in [-1,1], (N,K) multi-hot labels, (N,H,W) uint8 masks."""
    ids = ds.ids[:n] if n else ds.ids
    imgs = np.stack([ds.load_image(i) for i in ids])
    masks = np.stack([ds.load_mask(i) for i in ids])
    labels = np.stack([ds.label_vector(i) for i in ids])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x, torch.from_numpy(labels), masks


@torch.no_grad()
def evaluate(model: ProbeCam, x: torch.Tensor, y: torch.Tensor, masks: np.ndarray) -> dict:
    """CAM mIoU (best background threshold) and classification mAP."""
    model.eval()
    k = y.shape[1]
    conf = np.zeros((len(THRESHOLDS), k + 1, k + 1), dtype=np.int64)
    scores = []
    for s in range(0, len(x), 128):
        xb = x[s : s + 128]
        logits = model(xb)
        scores.append(logits.mean(dim=(2, 3)))
        cam = F.interpolate(F.relu(logits), size=xb.shape[-2:], mode="bilinear")
        cam = cam * y[s : s + 128, :, None, None]  # keep present classes only
        cam = cam / cam.amax(dim=(2, 3), keepdim=True).clamp_min(1e-5)
        cam = cam.numpy()
        for b in range(len(xb)):
            gt = masks[s + b].astype(np.int64)
            valid = gt != 255
            for ti, t in enumerate(THRESHOLDS):
                stack = np.concatenate([np.full((1, *gt.shape), t), cam[b]], axis=0)
                pred = stack.argmax(axis=0)
                conf[ti] += np.bincount(
                    gt[valid] * (k + 1) + pred[valid], minlength=(k + 1) ** 2
                ).reshape(k + 1, k + 1)
    tp = np.diagonal(conf, axis1=1, axis2=2)
    iou = tp / (conf.sum(1) + conf.sum(2) - tp).clip(min=1)
    miou = iou.mean(axis=1)
    best = int(miou.argmax())
    sc = torch.cat(scores).numpy()
    ap = [average_precision(sc[:, c], y[:, c].numpy()) for c in range(k)]
    model.train()
    return {
        "cam_miou": round(100 * float(miou[best]), 2),
        "threshold": THRESHOLDS[best],
        "per_class_iou": [round(100 * float(v), 1) for v in iou[best]],
        "map": round(100 * float(np.mean(ap)), 2),
    }


def average_precision(score: np.ndarray, target: np.ndarray) -> float:
    order = np.argsort(-score, kind="stable")
    t = target[order]
    if t.sum() == 0:
        return float("nan")
    hits = np.cumsum(t)
    return float((hits / np.arange(1, len(t) + 1) * t).sum() / t.sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget")
    p.add_argument(
        "--steps", type=int, default=0, help="train this many steps instead (schedule by step)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=float, default=60.0, help="seconds between evaluations")
    p.add_argument("--eval-images", type=int, default=500)
    p.add_argument("--cache", default=None, help="shapes cache folder (default: WEAKTR_CACHE)")
    p.add_argument("--config", default="{}", help="JSON overrides of ShapesConfig")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = ShapesConfig(**json.loads(args.config))
    train = open_shapes("train", root=args.cache, config=cfg)
    x, y, _ = load_split(train)
    ex, ey, emasks = load_split(train, args.eval_images)
    model = ProbeCam(cfg.image_size, args.patch, args.dim, args.depth, y.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    budget = args.minutes * 60
    start = time.perf_counter()
    next_eval, step, seen, best = args.eval_every, 0, 0, None
    gen = torch.Generator().manual_seed(args.seed)
    while True:
        elapsed = time.perf_counter() - start
        # progress in [0, 1]: by steps when --steps is given (load-independent), else by time
        frac = step / args.steps if args.steps else elapsed / budget
        if frac >= 1:
            break
        # linear warm-up over the first 5 %, then cosine to 1 % of the peak
        lr = args.lr * (frac / 0.05 if frac < 0.05 else
                        0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * frac)))  # fmt: skip
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(x), (args.batch,), generator=gen)
        xb, yb = x[idx], y[idx]
        flip = torch.rand(args.batch, generator=gen) < 0.5
        xb[flip] = xb[flip].flip(-1)
        loss = F.multilabel_soft_margin_loss(model(xb).mean(dim=(2, 3)), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        seen += args.batch
        if time.perf_counter() - start >= next_eval:
            train_s = time.perf_counter() - start
            res = evaluate(model, ex, ey, emasks)
            next_eval += args.eval_every
            start += time.perf_counter() - start - train_s  # evaluation time is not training
            res.update(step=step, images=seen, train_s=round(train_s), loss=round(loss.item(), 4))
            print(json.dumps(res), flush=True)
            best = res if best is None or res["cam_miou"] > best["cam_miou"] else best
    res = evaluate(model, ex, ey, emasks)
    res.update(step=step, images=seen, train_s=round(time.perf_counter() - start), final=True)
    print(json.dumps(res), flush=True)
    best = res if best is None or res["cam_miou"] > best["cam_miou"] else best
    print(json.dumps({"best_cam_miou": best["cam_miou"], "at_step": best["step"]}), flush=True)


if __name__ == "__main__":
    main()
