"""What a weaktr file holds, for `weaktr inspect`: artifacts, checkpoints, ONNX models.

The file kind is told by its first bytes, never by its name: HDF5 files start with the HDF5
signature, safetensors checkpoints with an 8-byte header length and a JSON object, `.state`
files (training state for `--resume`) are torch zip archives, anything else is tried as ONNX.
Every description is a JSON-ready dict whose "format" key says which of the four it is.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from weaktr_cli.errors import WeakTrError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"
FORMATS = ("artifact", "checkpoint", "training-state", "onnx", "reference-checkpoint")


def sniff(path: Path) -> str:
    """One of FORMATS, from the first bytes of `path`."""
    if not path.is_file():
        raise WeakTrError(f"artifact, checkpoint or model {path} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(9)
    if head.startswith(HDF5_SIGNATURE):
        return "artifact"
    if head.startswith(ZIP_SIGNATURE):
        return "training-state"
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 1 << 30:
        return "checkpoint"
    return "onnx"


def describe(path: str | Path) -> dict[str, Any]:
    """A description of an artifact, a checkpoint (or its `.last`), a `.state` or an ONNX file:
    its "format" (one of FORMATS), its "path", then what that format holds."""
    path = Path(path)
    kind = sniff(path)
    if kind == "training-state" and not path.name.endswith(".state") \
            and _is_reference_segmenter(path):
        kind = "reference-checkpoint"
    return {"format": kind, "path": str(path), **_DESCRIBERS[kind](path)}


def _is_reference_segmenter(path: Path) -> bool:
    """A torch file holding a hustvl/WeakTr segmentation state dict (docs/REPRODUCING.md)."""
    from weaktr_cli.models.weights import read_state_dict

    try:
        state = read_state_dict(path)
    except WeakTrError:
        return False
    return "encoder.patch_embed.proj.weight" in state and "decoder.cls_emb" in state


def describe_reference(path: Path) -> dict[str, Any]:
    """A released reference segmentation checkpoint: what `--reference-checkpoint` will run."""
    from weaktr_cli.reference_model import describe_reference_checkpoint

    return {"file_bytes": path.stat().st_size, **describe_reference_checkpoint(path)}


def describe_artifact(path: Path) -> dict[str, Any]:
    from weaktr_cli.artifacts import open_artifact

    with open_artifact(path) as reader:
        meta = reader.meta
        return {
            "kind": meta.kind,
            "schema_version": meta.schema_version,
            "images": len(reader),
            "dataset": meta.dataset,
            "split": meta.split,
            "data_root": meta.data_root or None,
            "num_classes": meta.num_classes,
            "class_names": list(meta.class_names),
            "file_bytes": path.stat().st_size,
            "data_bytes": reader.stored_bytes(),
            "command": meta.command,
            "weaktr_version": meta.weaktr_version,
            "seed": meta.seed,
            "created": meta.created,
            "config": meta.config,
            "parents": meta.parents,
        }


def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    """name -> shape of every tensor, from the safetensors header (no weights are read)."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def describe_checkpoint(path: Path) -> dict[str, Any]:
    """Model kind and architecture, classes, training data and settings, result, companions."""
    from weaktr_cli.checkpoints import read_checkpoint_meta

    meta = read_checkpoint_meta(path)
    shapes = _tensor_shapes(path)
    parameters = 0
    for shape in shapes.values():
        count = 1
        for n in shape:
            count *= n
        parameters += count
    train = meta.get("train", {})
    model = meta.get("model", {})
    arch = model.get("arch", {})
    history = meta.get("history") or []
    result: dict[str, Any] = {}
    if meta.get("kind") == "cam":
        result = {"epochs": meta.get("epoch"), "steps": meta.get("step"),
                  "val_map": (history[-1] if history else {}).get("val_map"),
                  "selected_by": meta.get("selected_by")}
    else:
        final = meta.get("final") or {}
        result = {"steps": meta.get("step"), "tau": meta.get("tau"), "loss": final.get("loss")}
    companions = {suffix: str(path) + suffix for suffix in (".last", ".state", ".jsonl")
                  if Path(str(path) + suffix).is_file()}
    return {
        "kind": meta.get("kind"),
        "format_version": meta.get("format_version"),
        "arch": arch.get("name") if isinstance(arch, dict) else arch,
        "encoder": model.get("encoder", arch if isinstance(arch, dict) else {}),
        "parameters": parameters,
        "tensors": len(shapes),
        "num_classes": len(meta.get("class_names", [])),
        "class_names": list(meta.get("class_names", [])),
        "dataset": meta.get("dataset"),
        "train_split": meta.get("train_split"),
        "recipe": meta.get("recipe"),
        "pretrained": meta.get("pretrained"),
        "seed": train.get("seed"),
        "precision": meta.get("precision", train.get("precision")),
        "train": train,
        "result": result,
        "seeds": meta.get("seeds"),
        "weaktr_version": meta.get("weaktr_version"),
        "torch_version": meta.get("torch_version"),
        "file_bytes": path.stat().st_size,
        "companions": companions,
    }


def describe_training_state(path: Path) -> dict[str, Any]:
    """A `<checkpoint>.state` file: what `--resume` restores."""
    from weaktr_cli.checkpoints import load_training_state

    state = load_training_state(path)
    return {
        "file_bytes": path.stat().st_size,
        "keys": sorted(str(k) for k in state),
        "step": state.get("step"),
        "epoch": state.get("epoch"),
        "checkpoint": str(path)[: -len(".state")] if str(path).endswith(".state") else None,
    }


def describe_onnx(path: Path) -> dict[str, Any]:
    """An exported model: kind, classes, input sizes, normalisation and its source checkpoint."""
    from weaktr_cli.onnx_infer import read_onnx_info

    try:
        info = read_onnx_info(path)
    except WeakTrError as exc:
        raise WeakTrError(
            f"{path} is not a weaktr artifact, checkpoint or ONNX model ({exc.message})",
            hint="inspect reads HDF5 artifacts, .ckpt/.last/.state files and exported .onnx",
        ) from None
    extra = info.extra
    return {
        "kind": info.kind,
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
        "dataset": extra.get("dataset"),
        "recipe": info.recipe,
        "arch": (extra.get("model") or {}).get("arch"),
        "input_size": list(info.input_size),
        "min_size": list(info.min_size),
        "dynamic": info.dynamic,
        "batch_size": info.batch_size,
        "crop_size": info.crop_size,
        "patch_size": info.patch_size,
        "layers": info.layers,
        "mean": list(info.mean),
        "std": list(info.std),
        "cam_variant": info.cam_variant,
        "checkpoint": extra.get("checkpoint"),
        "checkpoint_sha256": extra.get("checkpoint_sha256"),
        "weaktr_version": info.weaktr_version,
        "file_bytes": path.stat().st_size,
    }


#: format -> what its description holds after "format" and "path"
_DESCRIBERS = {"artifact": describe_artifact, "checkpoint": describe_checkpoint,
               "training-state": describe_training_state, "onnx": describe_onnx,
               "reference-checkpoint": describe_reference}
