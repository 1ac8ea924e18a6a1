"""Run by test_end_to_end under torchrun: train 2 steps with DDP, then each rank writes the
step count and a hash of its parameters, which must agree across ranks."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from tests._registry_entries import register_test_entries
from weaktr_cli.data.shapes import open_shapes
from weaktr_cli.recipes import resolve
from weaktr_cli.train_cam import train_cam
from weaktr_cli.training import TrainingOptions


def main() -> None:
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    register_test_entries()
    config = resolve("cam", "smoke", batch_size=4, max_steps=2, epochs=1)
    result = train_cam(open_shapes("train", root), None, out / "cam.ckpt", config,
                       options=TrainingOptions("cpu"))
    assert result.model is not None
    digest = hashlib.sha256()
    for name, tensor in sorted(result.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    rank = int(os.environ.get("RANK", 0))
    (out / f"rank{rank}.txt").write_text(f"{result.steps} {digest.hexdigest()}\n")


if __name__ == "__main__":
    main()
