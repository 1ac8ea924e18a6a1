"""ONNX export of the segmenter and the CAM model, verified numerically before it is kept.

Both kinds are exported through small wrappers, so tracing-only changes stay out of the
training models:

- `SegmenterExport`: input ``pixels`` float32 (B, 3, H, W), RGB values 0-255, *not*
  normalised: the checkpoint's mean/std are applied inside the graph, so a consumer only
  resizes and crops (float pixels, because resizing makes fractional values). Output
  ``logits`` float32 (B, n_cls, H, W), channel k = class id k; with `all_layers=True`
  (B, L, n_cls, H, W), every decoder layer's logits, for the reference's 0.8 P1 + P2 mix.
- `CamExport`: the same input; output ``cams`` float32 (B, C, h, w) at the patch grid
  h = H // p, w = W // p, channel c = foreground class id c + 1; variant fine, cross or coarse.

`export_onnx` uses the dynamo exporter (`torch.export`; the legacy TorchScript exporter bakes
the positional-embedding grid into the graph). It writes a temporary file next to `out`, adds
metadata, runs `onnx.checker`, compares onnxruntime with PyTorch on seeded random pixels (at the
exported shape and, for dynamic exports, at another batch size and H, W that are not
multiples of the patch) and only then renames the file to `out`: a failed export leaves
nothing behind.

Default opset 18: the exporter's own operator set (torch's ONNX functions are written for it,
other versions go through the ONNX version converter); it has LayerNormalization and is run
by onnxruntime >= 1.14 and current TensorRT / OpenVINO releases.

Metadata (`metadata_props`, every value a string, JSON where structured): see `METADATA_KEYS`;
`weaktr_cli.onnx_infer.OnnxModelInfo` reads it back without torch.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from weaktr_cli import __version__
from weaktr_cli.data.loader import IMAGENET_MEAN, IMAGENET_STD
from weaktr_cli.errors import WeakTrError
from weaktr_cli.files import atomic_file
from weaktr_cli.models.cam_vit import CAM_VARIANTS, WeakTrCAM, cam_maps, record_attention
from weaktr_cli.models.fusion import weighted_mean_attention
from weaktr_cli.models.segmenter import Segmenter

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_OPSET",
    "EXPORT_KINDS",
    "FORMAT_VERSION",
    "METADATA_KEYS",
    "CamExport",
    "ExportCheck",
    "ExportReport",
    "SegmenterExport",
    "export_checkpoint",
    "export_onnx",
    "verify_onnx",
]

DEFAULT_OPSET = 18
DEFAULT_ATOL = 1e-4
EXPORT_KINDS = ("segmenter", "cam")
#: version of the metadata layout below; readers refuse newer ones
FORMAT_VERSION = 1
INPUT_NAME = "pixels"
OUTPUT_NAMES = {"segmenter": "logits", "cam": "cams"}

#: metadata_props written into every exported model (values are strings; JSON where noted)
METADATA_KEYS = {
    "weaktr.format_version": "int, version of this metadata layout",
    "weaktr.kind": '"segmenter" or "cam"',
    "weaktr.version": "weaktr version that exported the model",
    "weaktr.class_names": "JSON list; class id i is class_names[i], 0 = background",
    "weaktr.mean": "JSON [r, g, b], normalisation mean on 0-1 pixels (applied in the graph)",
    "weaktr.std": "JSON [r, g, b], normalisation std (applied in the graph)",
    "weaktr.patch_size": "int, ViT patch size in pixels",
    "weaktr.crop_size": "int, training crop of the model (default inference window)",
    "weaktr.input_size": "JSON [H, W], the exported (example) input size",
    "weaktr.min_size": "JSON [H, W], the smallest input a dynamic model accepts",
    "weaktr.dynamic": '"true": batch, H, W are free; "false": the input shape is fixed',
    "weaktr.batch_size": "int, the fixed batch size (dynamic models: the example's)",
    "weaktr.layers": "int, decoder layers in the output (1 = last layer only)",
    "weaktr.cam_variant": "CAM models: fine, cross or coarse",
    "weaktr.input": "JSON {name, dtype, layout, range}",
    "weaktr.output": "JSON {name, dtype, layout, channels}",
    "weaktr.extra": "JSON object: caller-supplied provenance (checkpoint, sha256, ...)",
}


# ----------------------------------------------------------------------------- wrappers


class _PixelNormalize(nn.Module):
    """float 0-255 RGB (B, 3, H, W) -> (x / 255 - mean) / std, as the torch pipelines do."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise WeakTrError(f"invalid normalisation mean {list(mean)} / std {list(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: Tensor) -> Tensor:
        mean, std = self.mean, self.std
        assert isinstance(mean, Tensor) and isinstance(std, Tensor)
        return (pixels / 255.0 - mean) / std


class SegmenterExport(nn.Module):
    """A `Segmenter` taking raw pixels: (B, 3, H, W) float32 RGB 0-255 -> logits.

    Returns (B, n_cls, H, W) float32 logits of the last decoder layer, or with `all_layers`
    (B, L, n_cls, H, W), the logits after every decoder layer (what `PredictSettings
    .layer_weights` mixes).
    """

    def __init__(
        self,
        model: Segmenter,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        *,
        all_layers: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, Segmenter):
            raise WeakTrError(f"expected a Segmenter, got {type(model).__name__}")
        self.model = model
        self.normalize = _PixelNormalize(mean, std)
        self.all_layers = all_layers

    def reference(self, pixels: Tensor) -> Tensor:
        """What the exported graph must compute: here the forward pass itself."""
        out: Tensor = self(pixels)
        return out

    def forward(self, pixels: Tensor) -> Tensor:
        images = self.normalize(pixels)
        if self.all_layers:
            return torch.stack(self.model.forward_layers(images), dim=1)
        logits: Tensor = self.model(images)
        return logits


_CUBIC_A = -0.75  # torch's bicubic kernel constant


def _cubic_matrix(out_len: Any, in_len: int, scale: Tensor) -> Tensor:
    """(out_len, in_len) float32 matrix of torch's bicubic resampling along one axis.

    `scale` is the 0-d input/output step; source coordinate = scale * (dst + 0.5) - 0.5,
    taps clamped to the border, A = -0.75, exactly as `F.interpolate(mode="bicubic",
    align_corners=False)`. Built from tensors so a symbolic `out_len` stays symbolic.
    """
    dst = torch.arange(out_len, dtype=torch.float32, device=scale.device)
    src = scale * (dst + 0.5) - 0.5
    first = torch.floor(src)
    t = src - first
    a = _CUBIC_A

    def near(x: Tensor) -> Tensor:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: Tensor) -> Tensor:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    columns = torch.arange(in_len, device=scale.device)
    matrix = torch.zeros((), device=scale.device)
    for k, weight in enumerate((far(t + 1), near(t), near(1 - t), far(2 - t))):
        tap = (first.long() + (k - 1)).clamp(0, in_len - 1)
        matrix = matrix + (tap[:, None] == columns[None, :]).float() * weight[:, None]
    return matrix


class CamExport(nn.Module):
    """A `WeakTrCAM` taking raw pixels: (B, 3, H, W) float32 RGB 0-255 -> CAMs (B, C, h, w).

    Same computation as `cam_maps(model, normalised images, variant)` (`reference`, which
    `export_onnx` compares onnxruntime with), written so that `torch.export` keeps batch, H
    and W symbolic:

    - the bottom/right remainder is cropped with `index_select` (slicing makes the exporter
      guard on whether the crop is a no-op and specialise the size);
    - the positional embedding is resampled by bicubic weight matrices built in the graph,
      with the reference's `scale_factor=(g + 0.1) / g0` steps, and the stored grid is used
      as is when the grid equals it (a tensor `where`, not a Python branch): the exporter
      would otherwise bake in the example's scale factor and the branch taken.

    Inputs need H, W >= 2 patches.
    """

    def __init__(
        self,
        model: WeakTrCAM,
        variant: str = "fine",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if not isinstance(model, WeakTrCAM):
            raise WeakTrError(f"expected a WeakTrCAM, got {type(model).__name__}")
        if variant not in CAM_VARIANTS:
            raise WeakTrError(
                f"unknown CAM variant {variant!r}", hint=f"choose one of: {', '.join(CAM_VARIANTS)}"
            )
        self.model = model
        self.variant = variant
        self.normalize = _PixelNormalize(mean, std)

    def reference(self, pixels: Tensor) -> Tensor:
        """What the exported graph must compute: `cam_maps` of the untouched model."""
        return cam_maps(self.model, self.normalize(pixels), self.variant)

    def _pos_embed(self, grid_h: Any, grid_w: Any) -> Tensor:
        model = self.model
        c = model.num_classes
        h0, w0 = model.base_grid
        dim = model.pos_embed.shape[-1]
        stored = model.pos_embed[:, c:].reshape(h0, w0, dim)
        gh = torch.full((), grid_h, dtype=torch.float64, device=stored.device)
        gw = torch.full((), grid_w, dtype=torch.float64, device=stored.device)
        same = (gh == h0) & (gw == w0)
        # A unit step is the identity resampling: the stored grid as is.
        step_h = torch.where(same, 1.0, h0 / (gh + 0.1)).float()
        step_w = torch.where(same, 1.0, w0 / (gw + 0.1)).float()
        rows = _cubic_matrix(grid_h, h0, step_h)
        cols = _cubic_matrix(grid_w, w0, step_w)
        patch = torch.einsum("ia,abd,jb->ijd", rows, stored, cols).reshape(1, -1, dim)
        return torch.cat([model.pos_embed[:, :c], patch], dim=1)

    def forward(self, pixels: Tensor) -> Tensor:
        model = self.model
        images = self.normalize(pixels)
        b, _, height, width = images.shape
        p, c = model.patch_size, model.num_classes
        h, w = height // p, width // p
        rows = torch.arange(h * p, device=images.device)
        cols = torch.arange(w * p, device=images.device)
        cropped = images.index_select(2, rows).index_select(3, cols)
        patches = model.backbone.patch_embed(cropped)  # (B, h, w, D)
        tokens = torch.cat([model.cls_token.expand(b, -1, -1), patches.flatten(1, 2)], dim=1)
        tokens = model.backbone.pos_drop(tokens + self._pos_embed(h, w))
        with record_attention(model.backbone.blocks, model.fusion.needs_features) as record:
            tokens = model.backbone.blocks(tokens)
        feat = tokens[:, c:].transpose(1, 2).reshape(b, -1, h, w)
        coarse = model.head(feat)
        if self.variant == "coarse":
            return coarse.clamp(min=0)
        weights = model.fusion(record.maps, record.outputs)
        fused = weighted_mean_attention([m[..., c:] for m in record.maps], weights)
        cross_cam = fused[:, :c].reshape(b, c, h, w) * F.relu(coarse)
        if self.variant == "cross":
            return cross_cam
        fine = torch.einsum("bpq,bcq->bcp", fused[:, c:], cross_cam.flatten(2))
        return fine.reshape(b, c, h, w)


# ----------------------------------------------------------------------------- report


@dataclass(frozen=True)
class ExportCheck:
    """One onnxruntime-vs-PyTorch comparison: input shape (B, 3, H, W) and the differences."""

    shape: tuple[int, int, int, int]
    max_abs_diff: float
    #: largest |PyTorch output|, to judge the difference (CAMs are small numbers)
    max_abs_ref: float


@dataclass
class ExportReport:
    """What `export_onnx` wrote and how it verified it."""

    path: Path
    kind: str
    opset: int
    dynamic: bool
    input_shape: tuple[int, int, int, int]
    output_shape: tuple[int, ...]
    atol: float
    checks: list[ExportCheck] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    export_seconds: float = 0.0
    verify_seconds: float = 0.0
    file_bytes: int = 0

    @property
    def max_abs_diff(self) -> float:
        """Largest difference over all checks."""
        return max((c.max_abs_diff for c in self.checks), default=float("nan"))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        out["max_abs_diff"] = self.max_abs_diff
        return out


# ----------------------------------------------------------------------------- export


def _min_size(kind: str, patch: int) -> tuple[int, int]:
    # Segmenter: padded up to whole patches, a 1-patch grid breaks timm's reshapes.
    # CAM: floor division drops the remainder, so two whole patches are needed.
    side = patch + 1 if kind == "segmenter" else 2 * patch
    return side, side


def _verify_shapes(
    kind: str, batch: int, height: int, width: int, patch: int, dynamic: bool
) -> list[tuple[int, int, int, int]]:
    """The exported shape, and for dynamic exports another batch size and an H, W that are
    not multiples of the patch (so the padding / cropping path is exercised)."""
    shapes = [(batch, 3, height, width)]
    if dynamic:
        low_h, low_w = _min_size(kind, patch)
        other_h = height + patch + 3
        other_w = width - patch + 3 if width - patch + 3 >= low_w else width + 2 * patch + 5
        shapes.append((1 if batch != 1 else 2, 3, max(other_h, low_h), other_w))
    return shapes


def _json(value: Any) -> str:
    return json.dumps(value, default=str)


def _build_metadata(
    *,
    kind: str,
    class_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    patch: int,
    crop: int,
    shape: tuple[int, int, int, int],
    dynamic: bool,
    layers: int,
    variant: str | None,
    extra: Mapping[str, Any] | None,
) -> dict[str, str]:
    b, _, h, w = shape
    dims = "B, 3, H, W" if dynamic else f"{b}, 3, {h}, {w}"
    if kind == "segmenter":
        out_layout = "B, L, K, H, W" if layers > 1 else "B, K, H, W"
        channels = "K = len(class_names); channel k is class id k"
        output = {"name": OUTPUT_NAMES[kind], "dtype": "float32", "layout": out_layout,
                  "channels": channels, "meaning": "logits (softmax over K = probabilities)"}
    else:
        output = {"name": OUTPUT_NAMES[kind], "dtype": "float32", "layout": "B, C, H // p, W // p",
                  "channels": "C = len(class_names) - 1; channel c is class id c + 1",
                  "meaning": f"{variant} class activation maps (non-negative, unnormalised)"}
    meta = {
        "weaktr.format_version": str(FORMAT_VERSION),
        "weaktr.kind": kind,
        "weaktr.version": __version__,
        "weaktr.class_names": _json(list(class_names)),
        "weaktr.mean": _json([float(v) for v in mean]),
        "weaktr.std": _json([float(v) for v in std]),
        "weaktr.patch_size": str(patch),
        "weaktr.crop_size": str(crop),
        "weaktr.input_size": _json([h, w]),
        "weaktr.min_size": _json(list(_min_size(kind, patch))),
        "weaktr.dynamic": "true" if dynamic else "false",
        "weaktr.batch_size": str(b),
        "weaktr.layers": str(layers),
        "weaktr.input": _json({
            "name": INPUT_NAME, "dtype": "float32", "layout": dims,
            "range": "RGB 0-255, not normalised (mean/std are applied in the graph)",
        }),
        "weaktr.output": _json(output),
        "weaktr.extra": _json(dict(extra or {})),
    }
    if variant is not None:
        meta["weaktr.cam_variant"] = variant
    return meta


def _wrap(
    model: nn.Module,
    kind: str,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    variant: str,
    all_layers: bool,
) -> tuple[nn.Module, int, int, int, int]:
    """(wrapper on a CPU eval copy of `model`, patch size, training crop, output layers,
    classes incl. background)."""
    # A copy: exporting must not move the caller's model or change its train/eval mode.
    model = copy.deepcopy(model).to("cpu").eval()
    if kind == "segmenter":
        if not isinstance(model, Segmenter):
            raise WeakTrError(f"kind 'segmenter' needs a Segmenter, got {type(model).__name__}")
        patch = model.patch_size[0]
        grid = model.encoder.patch_embed.grid_size
        crop = int(grid[0]) * patch if grid is not None else patch
        layers = model.num_decoder_layers if all_layers else 1
        seg = SegmenterExport(model, mean, std, all_layers=all_layers).eval()
        return seg, patch, crop, layers, model.n_cls
    if kind == "cam":
        if not isinstance(model, WeakTrCAM):
            raise WeakTrError(f"kind 'cam' needs a WeakTrCAM, got {type(model).__name__}")
        cam = CamExport(model, variant, mean, std).eval()
        return cam, model.patch_size, model.arch.img_size, 1, model.num_classes + 1
    raise WeakTrError(f"unknown export kind {kind!r}", hint=f"use one of {', '.join(EXPORT_KINDS)}")


def _require_onnx() -> None:
    """The exporter needs onnx + onnxscript, the check onnxruntime: the `onnx` extra."""
    import importlib.util

    needed = ("onnx", "onnxscript", "onnxruntime")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise WeakTrError(
            f"ONNX export needs {', '.join(missing)}, which is not installed",
            hint="pip install 'weaktr[onnx]'",
        )


def _random_pixels(shape: tuple[int, ...], seed: int) -> np.ndarray:
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
    _require_onnx()
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
        pixels = _random_pixels(shape, seed=i)
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


def export_onnx(
    model: nn.Module,
    out: str | Path,
    *,
    kind: str,
    class_names: Sequence[str],
    height: int | None = None,
    width: int | None = None,
    dynamic: bool = False,
    batch_size: int = 1,
    opset: int = DEFAULT_OPSET,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    variant: str = "fine",
    all_layers: bool = False,
    metadata: Mapping[str, Any] | None = None,
    atol: float = DEFAULT_ATOL,
) -> ExportReport:
    """Export a `Segmenter` (kind "segmenter") or `WeakTrCAM` (kind "cam") to ONNX, verified.

    Args:
        model: the trained model (any device; a CPU copy is exported, `model` is untouched).
        out: the .onnx file to write (atomically: nothing is there if any step fails).
        kind: "segmenter" or "cam".
        class_names: the checkpoint's class names, background first.
        height, width: the input size (default: the model's training crop / CAM input size).
            Fixed exports accept only this size; dynamic ones use it as the example.
        dynamic: False: the input is fixed at (batch_size, 3, height, width); True: batch, H
            and W are free (H, W at least `min_size` in the metadata).
        batch_size: fixed exports: the batch the model takes. Dynamic exports trace with a
            batch of at least 2 (a traced batch of 1 would be fixed at 1).
        opset: ONNX opset (default `DEFAULT_OPSET` = 18, see the module docstring).
        mean, std: input normalisation of the checkpoint (on 0-1 pixels), put in the graph.
        variant: CAM models: "fine", "cross" or "coarse".
        all_layers: segmenters: output every decoder layer's logits (B, L, K, H, W).
        metadata: extra provenance stored as JSON under ``weaktr.extra``.
        atol: largest accepted max-abs difference between onnxruntime and PyTorch.

    Returns an `ExportReport` with the per-shape differences.
    """
    _require_onnx()
    if kind not in EXPORT_KINDS:
        raise WeakTrError(
            f"unknown export kind {kind!r}", hint=f"use one of {', '.join(EXPORT_KINDS)}"
        )
    if batch_size < 1:
        raise WeakTrError(f"batch size must be >= 1, got {batch_size}")
    if not atol >= 0:
        raise WeakTrError(f"the tolerance must be >= 0, got {atol}")
    if opset < 18:
        raise WeakTrError(
            f"opset {opset} is older than the exporter's operator set 18",
            hint="use --opset 18 or newer",
        )
    wrapper, patch, crop, layers, n_out = _wrap(
        model, kind, mean=mean, std=std, variant=variant, all_layers=all_layers
    )
    if len(class_names) != n_out:
        raise WeakTrError(
            f"{len(class_names)} class names for a {kind} model of {n_out} classes "
            "(background included)",
            hint="pass the class names stored in the checkpoint",
        )
    height = crop if height is None else int(height)
    width = crop if width is None else int(width)
    low_h, low_w = _min_size(kind, patch)
    if height < low_h or width < low_w:
        raise WeakTrError(
            f"export size {height}x{width} is below the smallest input {low_h}x{low_w} "
            f"of a patch-{patch} {kind} model"
        )
    batch = max(batch_size, 2) if dynamic else batch_size
    shape = (batch, 3, height, width)
    meta = _build_metadata(
        kind=kind, class_names=class_names, mean=mean, std=std, patch=patch,
        crop=crop, shape=shape, dynamic=dynamic, layers=layers,
        variant=variant if kind == "cam" else None, extra=metadata,
    )
    out = Path(out)
    if not out.parent.is_dir():
        raise WeakTrError(f"output folder {out.parent} does not exist")
    with atomic_file(out) as tmp:
        started = time.perf_counter()
        program = _run_exporter(wrapper, shape, kind=kind, dynamic=dynamic, opset=opset)
        program.model.metadata_props.update(meta)
        try:
            program.save(tmp, external_data=False)
        except ValueError as exc:  # protobuf's 2 GB limit
            raise WeakTrError(f"cannot write {out}: {exc}") from exc
        exported = time.perf_counter() - started
        (in_b, _, in_h, in_w), output_shape = _io_shapes(tmp)
        fixed = [n for n, d in (("batch", in_b), ("height", in_h), ("width", in_w)) if d >= 0]
        if dynamic and fixed:
            # The exporter can silently fix a size it cannot prove generic.
            raise WeakTrError(
                f"the exporter fixed the {', '.join(fixed)} of the input instead of keeping "
                "it dynamic",
                hint="export without --dynamic, or report this with your torch version",
            )
        started = time.perf_counter()
        reference = wrapper.reference
        assert callable(reference)
        checks = verify_onnx(
            tmp, reference, _verify_shapes(kind, batch, height, width, patch, dynamic), atol=atol
        )
        verified = time.perf_counter() - started
    return ExportReport(
        path=out, kind=kind, opset=opset, dynamic=dynamic, input_shape=shape,
        output_shape=output_shape, atol=atol, checks=checks, metadata=meta,
        export_seconds=exported, verify_seconds=verified, file_bytes=out.stat().st_size,
    )


def _run_exporter(
    wrapper: nn.Module, shape: tuple[int, int, int, int], *, kind: str, dynamic: bool, opset: int
) -> Any:
    """torch.onnx.export (dynamo) of `wrapper` on a seeded example; the exporter's progress
    lines are kept off stdout (results go there)."""
    example = torch.from_numpy(_random_pixels(shape, seed=0))
    dims = ({0: "batch", 2: "height", 3: "width"},) if dynamic else None
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), torch.no_grad():
            return torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                dynamic_shapes=dims,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAMES[kind]],
                opset_version=opset,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; the chain keeps the details
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise WeakTrError(
            f"ONNX export of the {kind} failed: {lines[0] if lines else type(exc).__name__}",
            hint="run with WEAKTR_DEBUG=1 for the exporter's traceback",
        ) from exc


def _io_shapes(path: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Input and output dims of an ONNX file; -1 marks a symbolic (dynamic) dim."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def dims(value: Any) -> tuple[int, ...]:
        return tuple(d.dim_value if d.HasField("dim_value") else -1
                     for d in value.type.tensor_type.shape.dim)

    return dims(graph.input[0]), dims(graph.output[0])


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    height: int | None = None,
    width: int | None = None,
    dynamic: bool = False,
    batch_size: int = 1,
    opset: int = DEFAULT_OPSET,
    variant: str = "fine",
    all_layers: bool = False,
    atol: float = DEFAULT_ATOL,
) -> ExportReport:
    """Export a weaktr checkpoint (segmenter from `retrain`, or CAM from `train-cam`).

    Class names and normalisation come from the checkpoint; its path, sha256, kind and
    model config are recorded under ``weaktr.extra``. Other arguments as `export_onnx`.
    """
    from weaktr_cli.artifacts import file_sha256
    from weaktr_cli.checkpoints import read_checkpoint_meta

    checkpoint = Path(checkpoint)
    kind = read_checkpoint_meta(checkpoint).get("kind")
    model: nn.Module
    if kind == "segmenter":
        from weaktr_cli.models.io import load_segmenter
        from weaktr_cli.settings import NORMALIZATIONS

        model, meta = load_segmenter(checkpoint)
        norm = str(meta["model"].get("normalization", "imagenet"))
        if norm not in NORMALIZATIONS:
            raise WeakTrError(f"{checkpoint} names an unknown normalisation {norm!r}")
        mean, std = NORMALIZATIONS[norm]
    elif kind == "cam":
        from weaktr_cli.models.io import load_cam_model

        model, meta = load_cam_model(checkpoint)
        mean, std = IMAGENET_MEAN, IMAGENET_STD  # CAM training normalises with ImageNet stats
    else:
        raise WeakTrError(f"{checkpoint} is a {kind!r} checkpoint; only segmenter and cam export")
    extra = {
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": file_sha256(checkpoint),
        "checkpoint_kind": kind,
        "model": meta.get("model"),
        "dataset": meta.get("dataset"),
    }
    return export_onnx(
        model, out, kind=kind, class_names=meta["class_names"], height=height, width=width,
        dynamic=dynamic, batch_size=batch_size, opset=opset, mean=mean, std=std,
        variant=variant, all_layers=all_layers, metadata=extra, atol=atol,
    )


def export_reference_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    normalization: str | None = None,
    num_heads: int | None = None,
    height: int | None = None,
    width: int | None = None,
    dynamic: bool = False,
    batch_size: int = 1,
    opset: int = DEFAULT_OPSET,
    all_layers: bool = False,
    atol: float = DEFAULT_ATOL,
) -> ExportReport:
    """Export a released reference segmentation checkpoint (`weaktr_cli.reference_model`).

    The graph normalises with the reference's statistics; class names are VOC's or COCO's
    by the class count (21, 91), else "class_<i>". Other arguments as `export_checkpoint`.
    """
    from weaktr_cli.artifacts import file_sha256
    from weaktr_cli.reference_model import open_reference_segmenter
    from weaktr_cli.settings import NORMALIZATIONS

    checkpoint = Path(checkpoint)
    model, meta = open_reference_segmenter(checkpoint, normalization=normalization,
                                           num_heads=num_heads)
    mean, std = NORMALIZATIONS[str(meta["model"]["normalization"])]
    n_cls = int(meta["model"]["n_cls"])
    if meta["dataset"] == "voc":
        from weaktr_cli.data.voc import VOC_CLASSES as names
    elif meta["dataset"] == "coco":
        from weaktr_cli.data.coco import COCO_CLASSES as names
    else:
        names = tuple(f"class_{i}" for i in range(n_cls))
    extra = {
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": file_sha256(checkpoint),
        "checkpoint_kind": "reference-segmenter",
        "model": meta["model"],
        "reference": meta["reference"],
        "dataset": meta["dataset"],
    }
    return export_onnx(
        model, out, kind="segmenter", class_names=list(names), height=height, width=width,
        dynamic=dynamic, batch_size=batch_size, opset=opset, mean=mean, std=std,
        all_layers=all_layers, metadata=extra, atol=atol,
    )
