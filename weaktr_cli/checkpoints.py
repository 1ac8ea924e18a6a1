"""Self-describing checkpoints: safetensors weights plus a JSON header, no pickle.

A checkpoint holds the model weights and, in the safetensors metadata key ``weaktr``, a JSON
object: model kind ("cam" or "segmenter"), architecture, model options, class names, the
training arguments, versions. Loading never executes code from the file. Training state for
`--resume` (optimizer, scheduler, step, RNG) lives in a separate `<ckpt>.state` file loaded
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from weaktr_cli import __version__
from weaktr_cli.errors import WeakTrError
from weaktr_cli.files import atomic_file

META_KEY = "weaktr"
FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor],
                    meta: dict[str, Any]) -> Path:
    """Write weights + metadata atomically (temp file, fsync, rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    header = {"format_version": FORMAT_VERSION, "weaktr_version": __version__,
              "torch_version": torch.__version__, **meta}
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(header, default=str)})
    return path


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The JSON header of a weaktr checkpoint, without loading the weights."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeakTrError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise WeakTrError(
            f"{path} is not a weaktr checkpoint (safetensors): {exc}",
            hint="an official hustvl/WeakTr .pth goes to --reference-checkpoint (dump-cams, "
            "predict, evaluate, export-onnx)",
        ) from exc
    if META_KEY not in metadata:
        raise WeakTrError(f"{path} has no weaktr metadata", hint="was it written by weaktr?")
    try:
        meta = json.loads(metadata[META_KEY])
    except (ValueError, RecursionError) as exc:
        raise WeakTrError(f"{path}: the weaktr metadata is not valid JSON ({exc})",
                          hint="the checkpoint header is corrupt; use another copy") from None
    version = meta.get("format_version", 0) if isinstance(meta, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise WeakTrError(f"{path}: the weaktr metadata has no integer format_version",
                          hint="the checkpoint header is corrupt; use another copy")
    if version > FORMAT_VERSION:
        raise WeakTrError(f"{path} was written by a newer weaktr", hint="upgrade weaktr")
    return dict(meta)


def torch_load_problem(exc: BaseException) -> str:
    """One line for a failed `torch.load(weights_only=True)`, without torch's advice to retry
    with weights_only=False (that would run whatever code the file carries)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in lines:  # torch names the refused object on a line of its own
        if "GLOBAL" in line or line.startswith("WeightsUnpickler error"):
            return f"it holds objects weaktr will not unpickle ({line.rstrip('.')})"
    first = lines[0] if lines else type(exc).__name__
    if "weights_only" in first or "Weights only" in first:
        return "it holds objects weaktr will not unpickle"
    return first.split(". ")[0]


def load_checkpoint(path: str | Path, kind: str | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, meta) of a weaktr checkpoint; `kind` checks the model kind."""
    from safetensors.torch import load_file

    meta = read_checkpoint_meta(path)
    if kind is not None and meta.get("kind") != kind:
        raise WeakTrError(
            f"{path} is a {meta.get('kind')!r} checkpoint, but a {kind!r} checkpoint is needed",
            hint="train-cam writes 'cam' checkpoints, retrain writes 'segmenter' ones",
        )
    try:
        return load_file(str(path)), meta
    except Exception as exc:  # safetensors raises its own error types
        raise WeakTrError(f"{path}: its weights are damaged ({str(exc).splitlines()[0]})",
                          hint="use another copy of the checkpoint") from exc


def save_training_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Optimizer/scheduler/step/RNG state for --resume (tensors and plain values only)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        torch.save(state, tmp)
    return path


def load_training_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise WeakTrError(f"no training state at {path} to resume from",
                          hint="start without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeakTrError(f"cannot read training state {path}: {torch_load_problem(exc)}",
                          hint="start without --resume") from exc
    if not isinstance(state, dict):
        raise WeakTrError(f"{path} is not a weaktr training state", hint="start without --resume")
    return state
