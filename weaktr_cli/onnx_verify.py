"""Numerical verification of an exported ONNX model: `onnx.checker`, then onnxruntime against
the PyTorch module it was exported from, on seeded random pixels (timm's `check_forward`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from weaktr_cli.errors import WeakTrError

__all__ = ["DEFAULT_ATOL", "ExportCheck", "random_pixels", "require_onnx", "verify_onnx"]

DEFAULT_ATOL = 1e-4


@dataclass(frozen=True)
class ExportCheck:
    """One onnxruntime-vs-PyTorch comparison: input shape (B, 3, H, W) and the differences."""

    shape: tuple[int, int, int, int]
    max_abs_diff: float
    #: largest |PyTorch output|, to judge the difference (CAMs are small numbers)
    max_abs_ref: float


def require_onnx() -> None:
    """The exporter needs onnx + onnxscript, the check onnxruntime: the `onnx` extra."""
    import importlib.util

    needed = ("onnx", "onnxscript", "onnxruntime")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise WeakTrError(
            f"ONNX export needs {', '.join(missing)}, which is not installed",
            hint="pip install 'weaktr[onnx]'",
        )


def random_pixels(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=shape).astype(np.float32)


def verify_onnx(
    path: str | Path,
    reference: Callable[[Tensor], Tensor],
    shapes: Sequence[tuple[int, int, int, int]],
    *,
    atol: float = DEFAULT_ATOL,
    threads: int | None = None,
) -> list[ExportCheck]:
    """`onnx.checker`, then onnxruntime vs PyTorch (CPU) on random pixels.

    Args:
        path: the ONNX file.
        reference: PyTorch function the graph must reproduce, (B, 3, H, W) float 0-255 ->
            output (`SegmenterExport.reference` / `CamExport.reference`).
        shapes: input shapes (B, 3, H, W) to compare at; inputs are seeded uniform 0-255.
        atol: the largest max-abs difference accepted.
        threads: onnxruntime intra-op threads (default: torch's thread count).

    Returns one `ExportCheck` per shape; raises `WeakTrError` naming the difference when one
    exceeds `atol`, the checker fails, or onnxruntime rejects an input shape.
    """
    require_onnx()
    import onnx
    import onnxruntime as ort

    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeakTrError(f"the exported ONNX model is invalid: {first}") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3  # errors reach us as exceptions; keep stderr quiet
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    checks = []
    for i, shape in enumerate(shapes):
        pixels = random_pixels(shape, seed=i)
        with torch.inference_mode():
            expected = reference(torch.from_numpy(pixels)).float().numpy()
        try:
            got = session.run(None, {input_name: pixels})[0]
        except Exception as exc:  # onnxruntime raises its own exception types
            first = str(exc).strip().splitlines()[0]
            raise WeakTrError(
                f"onnxruntime cannot run the exported model on input {shape}: {first}",
                hint="the exporter may have fixed a size it should have kept dynamic",
            ) from exc
        if got.shape != expected.shape:
            raise WeakTrError(
                f"onnxruntime output {got.shape} differs from PyTorch {expected.shape} "
                f"for input {shape}"
            )
        diff = float(np.max(np.abs(got.astype(np.float64) - expected)))
        check = ExportCheck(shape, diff, float(np.max(np.abs(expected))))
        checks.append(check)
        if not diff <= atol:  # also catches NaN
            raise WeakTrError(
                f"onnxruntime and PyTorch differ by {diff:.3g} (max abs) at input {shape}, "
                f"above the tolerance {atol:g}",
                hint="report this with the model; a larger --atol accepts it at your own risk",
            )
    return checks
