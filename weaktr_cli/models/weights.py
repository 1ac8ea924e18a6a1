"""Load local pretrained ViT weights (ImageNet DeiT / ViT checkpoints) into our backbones.

Never downloads: the user passes a file (`.pth`/`.pt`/`.bin` via `torch.load(weights_only=True)`,
or `.safetensors`). Nested checkpoints ({"model": ...} as DeiT ships them, {"state_dict": ...})
are unwrapped and a DistributedDataParallel "module." prefix is stripped.

Targets:

- `WeakTrCAM`: timm keys go under `backbone.`; the single class token and its positional
  embedding are repeated C times (docs/method.md); the checkpoint's classifier (`head.*`) and final
  norm (`norm.*`, never applied by the CAM model) are dropped; the CAM head and the fusion stay
  randomly initialised.
- a timm `VisionTransformer` (e.g. the retraining encoder): keys match one to one; `head.*`
  is dropped when the model has no classifier.

Patch positional embeddings are resampled to the model's stored grid with timm's
`resample_abs_pos_embed` (bicubic, no antialiasing, like the reference's fine-tune code). The key
check is strict: any missing, unexpected or mis-shaped key raises one `WeakTrError` naming them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from timm.layers.pos_embed import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from weaktr_cli.errors import WeakTrError
from weaktr_cli.models.cam_vit import WeakTrCAM, resample_patch_pos_embed

if TYPE_CHECKING:
    from weaktr_cli.models.segmenter import Segmenter

__all__ = [
    "LoadReport",
    "describe_key_mismatch",
    "load_encoder_weights",
    "load_pretrained_backbone",
    "read_state_dict",
    "strict_load",
]

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def _numpy_scalar_globals() -> list[Any]:
    # Training scripts often save metrics as numpy scalars next to the weights (the reference
    # stores its mIoU as numpy.float64); allow exactly those, still without arbitrary code.
    import numpy as np
    from numpy._core.multiarray import scalar

    return [
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),  # name in pickles written by NumPy 1.x
        np.dtype,
        np.dtypes.Float64DType,
        np.dtypes.Float32DType,
        np.dtypes.Int64DType,
    ]


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a local checkpoint file, unwrapped from "model"/"state_dict" containers.

    Other entries next to the container (epoch, metrics) are ignored; a "module." prefix on
    every key is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeakTrError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    _refuse_weaktr_checkpoint(path)
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise WeakTrError(f"cannot read safetensors file {path}: {exc}") from exc
    elif suffix in _TORCH_SUFFIXES:
        try:
            with torch.serialization.safe_globals(_numpy_scalar_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors come in many types
            from weaktr_cli.checkpoints import torch_load_problem

            raise WeakTrError(
                f"cannot load {path} as a weights-only torch checkpoint: "
                f"{torch_load_problem(exc)}",
                hint="re-save it as a plain state_dict (torch.save(model.state_dict(), ...))",
            ) from exc
    else:
        raise WeakTrError(
            f"unsupported weights format {suffix or '(no suffix)'!r}: {path}",
            hint="pass a .pth/.pt or .safetensors file (convert .npz with timm first)",
        )
    for container in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(container), Mapping):
            obj = obj[container]
    if not isinstance(obj, Mapping) or not obj:
        raise WeakTrError(f"{path} holds no state dict of tensors")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeakTrError(
            f"{path}: {len(bad)} entries are not tensors ({_few(bad)})",
            hint="expected a state dict, optionally under a 'model' or 'state_dict' key",
        )
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _refuse_weaktr_checkpoint(path: Path) -> None:
    """A weaktr checkpoint (safetensors + our header, any suffix) is not ImageNet weights."""
    from weaktr_cli.checkpoints import read_checkpoint_meta

    with path.open("rb") as fh:
        head = fh.read(9)
    if len(head) < 9 or head[8:9] != b"{":  # safetensors: u64 header length, then JSON
        return
    try:
        kind = read_checkpoint_meta(path).get("kind")
    except WeakTrError:
        return  # plain safetensors weights, or not safetensors at all: read as usual
    raise WeakTrError(
        f"{path} is a weaktr {kind!r} checkpoint, not ImageNet ViT weights",
        hint="pass ImageNet DeiT/ViT weights (.pth/.safetensors); to continue a train-cam run "
        "use --resume; retrain --pretrained takes a cam checkpoint",
    )


def _few(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def describe_key_mismatch(
    missing: Iterable[str],
    unexpected: Iterable[str],
    mismatched: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
) -> str:
    """One line naming up to 5 keys of each kind with counts (empty when all match).

    mismatched maps key -> (checkpoint shape, model shape).
    """
    missing, unexpected = sorted(missing), sorted(unexpected)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
    if mismatched:
        shown = [f"{k} {list(a)} vs model {list(b)}" for k, (a, b) in sorted(mismatched.items())]
        parts.append(f"{len(shown)} shape mismatch(es): {_few(shown)}")
    return "; ".join(parts)


def strict_load(
    model: nn.Module, state: Mapping[str, Tensor], *, what: str, fresh: Iterable[str] = ()
) -> None:
    """Load `state` into `model` with a strict key and shape check.

    `fresh` names model keys that are allowed to be absent (they keep their initial values).
    Raises `WeakTrError` naming missing/unexpected/mis-shaped keys.
    """
    target = model.state_dict()
    allowed_missing = set(fresh)
    missing = [k for k in target if k not in state and k not in allowed_missing]
    unexpected = [k for k in state if k not in target]
    mismatched = {
        k: (tuple(v.shape), tuple(target[k].shape))
        for k, v in state.items()
        if k in target and v.shape != target[k].shape
    }
    problem = describe_key_mismatch(missing, unexpected, mismatched)
    if problem:
        raise WeakTrError(f"{what} does not fit the model: {problem}")
    merged = dict(target)
    merged.update(state)
    model.load_state_dict(merged, strict=True)


@dataclass
class LoadReport:
    """What `load_pretrained_backbone` did."""

    path: Path
    loaded: int  #: number of tensors taken from the file
    dropped: list[str] = field(default_factory=list)  #: checkpoint keys deliberately unused
    fresh: list[str] = field(default_factory=list)  #: model keys left at their initial values
    #: (checkpoint grid, model grid) when the patch pos-embed was resampled
    pos_embed_resampled: tuple[tuple[int, int], tuple[int, int]] | None = None
    class_token_repeats: int = 1

    def summary(self) -> str:
        """One line for the training log, e.g. "152 tensors, position grid 14x14 -> 28x28"."""
        parts = [f"{self.loaded} tensors"]
        if self.pos_embed_resampled:
            (a, b), (c, d) = self.pos_embed_resampled
            parts.append(f"position grid {a}x{b} -> {c}x{d}")
        if self.class_token_repeats > 1:
            parts.append(f"class token repeated for {self.class_token_repeats} classes")
        if self.fresh:
            parts.append(f"{len(self.fresh)} fresh ({', '.join(self.fresh[:3])})")
        return ", ".join(parts)


def _square_grid(num_patches: int, path: Path) -> tuple[int, int]:
    g = math.isqrt(num_patches)
    if g * g != num_patches:
        raise WeakTrError(
            f"{path}: positional embedding of {num_patches} patches is not a square grid"
        )
    return (g, g)


def _resample(
    pos: Tensor, num_prefix: int, new_grid: tuple[int, int], path: Path
) -> tuple[Tensor, tuple[int, int]]:
    old_grid = _square_grid(pos.shape[1] - num_prefix, path)
    if old_grid == new_grid:
        return pos, old_grid
    out = resample_abs_pos_embed(
        pos,
        new_size=list(new_grid),
        old_size=list(old_grid),
        num_prefix_tokens=num_prefix,
        interpolation="bicubic",
        antialias=False,
    )
    return out, old_grid


def load_pretrained_backbone(model: nn.Module, path: str | Path) -> LoadReport:
    """Load an ImageNet ViT checkpoint from `path` into a `WeakTrCAM` or a timm ViT, in place.

    See the module docstring for the mapping; raises `WeakTrError` on any key mismatch.
    """
    path = Path(path)
    state = read_state_dict(path)
    if isinstance(model, WeakTrCAM):
        return _load_into_cam(model, state, path)
    if isinstance(model, VisionTransformer):
        return _load_into_vit(model, state, path)
    raise WeakTrError(f"cannot load ViT weights into a {type(model).__name__}")


def _need(state: Mapping[str, Tensor], key: str, path: Path) -> Tensor:
    if key not in state:
        raise WeakTrError(
            f"{path} is not a ViT checkpoint: no {key!r} (keys: {_few(state)})",
            hint="pass an ImageNet DeiT/ViT checkpoint such as deit_small_patch16_224-cd65a155.pth",
        )
    return state[key]


def _load_into_cam(model: WeakTrCAM, state: dict[str, Tensor], path: Path) -> LoadReport:
    cls_token = _need(state, "cls_token", path)
    pos = _need(state, "pos_embed", path)
    if cls_token.ndim != 3 or cls_token.shape[1] != 1:
        raise WeakTrError(
            f"{path} has {cls_token.shape[1] if cls_token.ndim == 3 else '?'} class tokens, "
            "expected an ImageNet checkpoint with one",
            hint="load a WeakTr CAM checkpoint with weaktr_cli.models.reference instead",
        )
    c = model.num_classes
    pos, old_grid = _resample(pos, 1, model.base_grid, path)
    mapped: dict[str, Tensor] = {
        "cls_token": cls_token.repeat(1, c, 1),
        "pos_embed": torch.cat([pos[:, :1].repeat(1, c, 1), pos[:, 1:]], dim=1),
    }
    dropped = []
    for key, value in state.items():
        if key in ("cls_token", "pos_embed"):
            continue
        if key.startswith(("head.", "norm.")):
            dropped.append(key)  # ImageNet classifier, and a final norm the CAM model never uses
            continue
        mapped["backbone." + key] = value
    fresh = [k for k in model.state_dict() if k.startswith(("head.", "fusion."))]
    strict_load(model, mapped, what=f"checkpoint {path}", fresh=fresh)
    return LoadReport(
        path=path,
        loaded=len(mapped),
        dropped=sorted(dropped),
        fresh=fresh,
        pos_embed_resampled=(old_grid, model.base_grid) if old_grid != model.base_grid else None,
        class_token_repeats=c,
    )


def _load_into_vit(model: VisionTransformer, state: dict[str, Tensor], path: Path) -> LoadReport:
    target = model.state_dict()
    mapped = dict(state)
    dropped = [k for k in state if k.startswith("head.") and k not in target]
    for k in dropped:
        del mapped[k]
    resampled = None
    if "pos_embed" in mapped and model.pos_embed is not None:
        grid = tuple(model.patch_embed.grid_size)
        new_grid = (int(grid[0]), int(grid[1]))
        num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        mapped["pos_embed"], old_grid = _resample(mapped["pos_embed"], num_prefix, new_grid, path)
        if old_grid != new_grid:
            resampled = (old_grid, new_grid)
    strict_load(model, mapped, what=f"checkpoint {path}")
    return LoadReport(
        path=path, loaded=len(mapped), dropped=sorted(dropped), pos_embed_resampled=resampled
    )


def load_encoder_weights(model: Segmenter, path: str | Path) -> str:
    """Initialise the encoder from `path`; returns what the file was ("imagenet" or "cam").

    - an ImageNet DeiT/ViT checkpoint (.pth/.safetensors): `load_pretrained_backbone`;
    - a weaktr ``cam`` checkpoint (from train-cam, same backbone shape): its patch embedding
      and blocks; the C class tokens (and their positional embeddings) are averaged into the
      encoder's one class token; the patch positional embedding is resampled to the encoder's
      grid. The final norm, which the CAM model never applies, keeps its identity init. On a
      dataset without ImageNet weights (the built-in shapes) this starts retraining from what
      phase 1 learned from the image-level labels.
    """
    from weaktr_cli.checkpoints import META_KEY, load_checkpoint

    path = Path(path)
    meta: dict[str, Any] = {}
    if path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {}).get(META_KEY, "{}"))
        except Exception:  # not a safetensors file: an ImageNet .pth
            meta = {}
    if meta.get("kind") == "segmenter":
        raise WeakTrError(
            f"{path} is a retrained segmenter, not encoder weights",
            hint="pass ImageNet ViT weights or a train-cam checkpoint",
        )
    if meta.get("kind") != "cam":
        load_pretrained_backbone(model.encoder, path)
        return "imagenet"
    state, _ = load_checkpoint(path, kind="cam")
    n = int(meta["model"]["num_classes"])
    encoder = model.encoder
    mapped = {k[len("backbone."):]: v for k, v in state.items()
              if k.startswith(("backbone.patch_embed.", "backbone.blocks."))}
    mapped["cls_token"] = state["cls_token"].mean(dim=1, keepdim=True)
    pos = state["pos_embed"]
    spec = meta["model"]["arch"]
    old_side = int(spec["img_size"]) // int(spec["patch_size"])
    old_grid = (old_side, old_side)
    grid = encoder.patch_embed.grid_size
    new_grid = (int(grid[0]), int(grid[1]))
    patch_pos = pos[:, n:]
    if old_grid != new_grid:
        patch_pos = resample_patch_pos_embed(patch_pos, old_grid, new_grid)
    mapped["pos_embed"] = torch.cat([pos[:, :n].mean(dim=1, keepdim=True), patch_pos], dim=1)
    strict_load(encoder, mapped, what=f"CAM checkpoint {path}",
                fresh=[k for k in encoder.state_dict() if k.startswith("norm.")])
    return "cam"
