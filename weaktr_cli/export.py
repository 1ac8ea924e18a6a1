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

Metadata (`metadata_props`, every value a string, JSON where structured): written by
`weaktr_cli.onnx_meta.build_metadata` (`METADATA_KEYS`), read back without torch by
`weaktr_cli.onnx_meta.OnnxModelInfo`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weaktr_cli import __version__
from weaktr_cli.data.loader import IMAGENET_MEAN, IMAGENET_STD
from weaktr_cli.errors import WeakTrError
from weaktr_cli.files import atomic_file
from weaktr_cli.models.cam_vit import WeakTrCAM
from weaktr_cli.models.segmenter import Segmenter
from weaktr_cli.onnx_graphs import CamExport, SegmenterExport
from weaktr_cli.onnx_meta import (
    FORMAT_VERSION,
    INPUT_NAME,
    METADATA_KEYS,
    OUTPUT_NAMES,
    build_metadata,
    min_input_size,
)
from weaktr_cli.onnx_verify import (
    DEFAULT_ATOL,
    ExportCheck,
    random_pixels,
    require_onnx,
    verify_onnx,
)
from weaktr_cli.predict_defaults import fuses_layers

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
    "export_reference_checkpoint",
    "verify_onnx",
]

DEFAULT_OPSET = 18
EXPORT_KINDS = ("segmenter", "cam")


# ----------------------------------------------------------------------------- report


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


def _verify_shapes(
    kind: str, shape: tuple[int, int, int, int], patch: int, dynamic: bool
) -> list[tuple[int, int, int, int]]:
    """The exported shape, and for dynamic exports another batch size and an H, W that are
    not multiples of the patch (so the padding / cropping path is exercised)."""
    batch, _, height, width = shape
    shapes = [shape]
    if dynamic:
        low_h, low_w = min_input_size(kind, patch)
        other_h = height + patch + 3
        other_w = width - patch + 3 if width - patch + 3 >= low_w else width + 2 * patch + 5
        shapes.append((1 if batch != 1 else 2, 3, max(other_h, low_h), other_w))
    return shapes


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
    recipe: str | None = None,
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
        recipe: the recipe the model was trained with (``weaktr.recipe``), if known.

    Returns an `ExportReport` with the per-shape differences.
    """
    require_onnx()
    _check_export_args(kind, batch_size, atol, opset)
    wrapper, patch, crop, layers, n_out = _wrap(
        model, kind, mean=mean, std=std, variant=variant, all_layers=all_layers
    )
    if len(class_names) != n_out:
        raise WeakTrError(
            f"{len(class_names)} class names for a {kind} model of {n_out} classes "
            "(background included)",
            hint="pass the class names stored in the checkpoint",
        )
    shape = _export_shape(kind, patch, crop, height, width, batch_size, dynamic)
    meta = build_metadata(
        kind=kind, class_names=class_names, mean=mean, std=std, patch=patch,
        crop=crop, shape=shape, dynamic=dynamic, layers=layers,
        variant=variant if kind == "cam" else None, extra=metadata, weaktr_version=__version__,
        recipe=recipe,
    )
    out = Path(out)
    if not out.parent.is_dir():
        raise WeakTrError(f"output folder {out.parent} does not exist")
    with atomic_file(out) as tmp:
        output_shape, exported = _write_graph(tmp, wrapper, shape, meta, kind=kind,
                                              dynamic=dynamic, opset=opset, out=out)
        started = time.perf_counter()
        checks = verify_onnx(tmp, _reference_of(wrapper),
                             _verify_shapes(kind, shape, patch, dynamic), atol=atol)
        verified = time.perf_counter() - started
    return ExportReport(
        path=out, kind=kind, opset=opset, dynamic=dynamic, input_shape=shape,
        output_shape=output_shape, atol=atol, checks=checks, metadata=meta,
        export_seconds=exported, verify_seconds=verified, file_bytes=out.stat().st_size,
    )


def _write_graph(tmp: Path, wrapper: nn.Module, shape: tuple[int, int, int, int],
                 meta: Mapping[str, str], *, kind: str, dynamic: bool, opset: int,
                 out: Path) -> tuple[tuple[int, ...], float]:
    """Export `wrapper` with `meta` into `tmp`; returns the output shape and the seconds
    the export took. Refuses a dynamic export that came out fixed."""
    started = time.perf_counter()
    program = _run_exporter(wrapper, shape, kind=kind, dynamic=dynamic, opset=opset)
    program.model.metadata_props.update(meta)
    try:
        program.save(tmp, external_data=False)
    except ValueError as exc:  # protobuf's 2 GB limit
        raise WeakTrError(f"cannot write {out}: {exc}") from exc
    exported = time.perf_counter() - started
    return _check_dynamic(tmp, dynamic), exported


def _reference_of(wrapper: nn.Module) -> Any:
    """The wrapper's PyTorch forward that the ONNX graph must reproduce."""
    reference = wrapper.reference
    assert callable(reference)
    return reference


def _check_export_args(kind: str, batch_size: int, atol: float, opset: int) -> None:
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


def _export_shape(kind: str, patch: int, crop: int, height: int | None, width: int | None,
                  batch_size: int, dynamic: bool) -> tuple[int, int, int, int]:
    """The (B, 3, H, W) example the exporter traces; H, W default to the training crop."""
    height = crop if height is None else int(height)
    width = crop if width is None else int(width)
    low_h, low_w = min_input_size(kind, patch)
    if height < low_h or width < low_w:
        raise WeakTrError(
            f"export size {height}x{width} is below the smallest input {low_h}x{low_w} "
            f"of a patch-{patch} {kind} model"
        )
    # A traced batch of 1 would be fixed at 1.
    batch = max(batch_size, 2) if dynamic else batch_size
    return (batch, 3, height, width)


def _check_dynamic(path: Path, dynamic: bool) -> tuple[int, ...]:
    """The exported output shape; refuses a dynamic export whose input sizes came out fixed."""
    (in_b, _, in_h, in_w), output_shape = _io_shapes(path)
    fixed = [n for n, d in (("batch", in_b), ("height", in_h), ("width", in_w)) if d >= 0]
    if dynamic and fixed:
        # The exporter can silently fix a size it cannot prove generic.
        raise WeakTrError(
            f"the exporter fixed the {', '.join(fixed)} of the input instead of keeping "
            "it dynamic",
            hint="export without --dynamic, or report this with your torch version",
        )
    return output_shape


def _run_exporter(
    wrapper: nn.Module, shape: tuple[int, int, int, int], *, kind: str, dynamic: bool, opset: int
) -> Any:
    """torch.onnx.export (dynamo) of `wrapper` on a seeded example; the exporter's progress
    lines are kept off stdout (results go there)."""
    example = torch.from_numpy(random_pixels(shape, seed=0))
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
    all_layers: bool | None = None,
    atol: float = DEFAULT_ATOL,
    expect: str | None = None,
    log: Callable[[str], None] | None = None,
) -> ExportReport:
    """Export a weaktr checkpoint (segmenter from `retrain`, or CAM from `train-cam`).

    Class names and normalisation come from the checkpoint; its path, sha256, kind and
    model config are recorded under ``weaktr.extra``, its training recipe as
    ``weaktr.recipe``. `all_layers` None: every decoder layer when the recipe's test time
    fuses them (`weaktr_cli.predict_defaults.fuses_layers`). `expect` ("segmenter" or "cam"):
    the kind the caller asked for; a checkpoint of the other kind is an error that says how to
    ask for it. `log` hears which export starts. Other arguments as `export_onnx`.
    """
    from weaktr_cli.artifacts import file_sha256
    from weaktr_cli.checkpoints import read_checkpoint_meta

    checkpoint = Path(checkpoint)
    kind = read_checkpoint_meta(checkpoint).get("kind")
    if expect is not None and kind != expect:
        raise WeakTrError(
            f"{checkpoint} is a {kind!r} checkpoint; {'--cam' if expect == 'cam' else 'this'} "
            f"exports a {expect!r} one", hint="add --cam for CAM checkpoints" if kind == "cam"
            else None)
    if log is not None:
        log(f"exporting {checkpoint} ({kind}) to ONNX opset {opset} ...")
    model: nn.Module
    if kind == "segmenter":
        from weaktr_cli.models.io import load_segmenter
        from weaktr_cli.settings import NORMALIZATIONS

        model, meta = load_segmenter(checkpoint)
        norm = str(meta["model"].get("normalization", "imagenet"))
        if norm not in NORMALIZATIONS:
            raise WeakTrError(f"{checkpoint} names an unknown normalisation {norm!r}")
        mean, std = NORMALIZATIONS[norm]
        if all_layers is None:
            all_layers = fuses_layers(meta.get("recipe"), meta.get("dataset"),
                                      model.num_decoder_layers)
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
        variant=variant, all_layers=bool(all_layers), metadata=extra, atol=atol,
        recipe=meta.get("recipe"),
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
    all_layers: bool | None = None,
    atol: float = DEFAULT_ATOL,
) -> ExportReport:
    """Export a released reference segmentation checkpoint (`weaktr_cli.reference_model`).

    The graph normalises with the reference's statistics; class names are VOC's or COCO's
    by the class count (21, 91), else "class_<i>". Other arguments as `export_checkpoint`
    (`all_layers` None: as the dataset's recipe's test time needs).
    """
    from weaktr_cli.artifacts import file_sha256
    from weaktr_cli.reference_model import open_reference_segmenter
    from weaktr_cli.settings import NORMALIZATIONS

    checkpoint = Path(checkpoint)
    model, meta = open_reference_segmenter(checkpoint, normalization=normalization,
                                           num_heads=num_heads)
    mean, std = NORMALIZATIONS[str(meta["model"]["normalization"])]
    if all_layers is None:
        all_layers = fuses_layers(None, meta["dataset"], model.num_decoder_layers)
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

