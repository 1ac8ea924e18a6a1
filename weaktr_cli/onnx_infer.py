"""Segmentation with an exported ONNX segmenter: onnxruntime and numpy only, no torch.

`OnnxSegmenter` reads everything it needs from the model's metadata (`weaktr.*` keys written
by `weaktr_cli.export`): class names, patch and crop size, input size, whether batch / H / W
are dynamic, how many decoder layers the output holds. The graph normalises raw 0-255 pixels
itself.

Pre- and post-processing mirror `weaktr_cli.predict.predict_probs` step for step, so the two
agree to float rounding. The "weaktr" procedure:

1. per scale: the short side becomes scale x `base_size` (or scale x its own length), and at
   least `window`; bilinear resize (half-pixel centres, no antialiasing, as
   `F.interpolate(mode="bilinear", align_corners=False)`) of the float pixels, clamped to
   0-255; with `flip`, the mirrored image as a second pass;
2. `window` x `window` crops every `stride` pixels, the last row / column aligned to the
   bottom / right border; logits averaged where windows overlap;
3. logits resized bilinearly to the original size, un-mirrored, softmax over classes; with
   `layer_weights` (a model exported with all decoder layers) the layers' probabilities are
   mixed with weights / sum(weights);
4. the probabilities of all passes averaged; label = argmax (optionally a dense CRF).

The "reference" procedure is `weaktr_cli.test_time`'s, step for step: the uint8 image resized
onto the uint8 grid (`resize_uint8_grid`) at `windows.reference_pass_sizes`, upsampled to the
window when smaller, per-layer probabilities averaged over the views, layers fused as
sum_k w_k P_k without renormalising and the CRF fed those planes as they are. The graph
normalises, so the upsampling acts on 0-255 values instead of normalised ones: both steps are
affine per channel, the results agree to float rounding.

A fixed-size export takes exactly its exported batch of `window` x `window` crops (the last
batch is padded by repeating a crop); a dynamic one takes `batch_size` crops of any window.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from weaktr_cli.data.align import check_class_names
from weaktr_cli.dense_crf import label_from_probs
from weaktr_cli.errors import WeakTrError
from weaktr_cli.onnx_meta import OnnxModelInfo
from weaktr_cli.settings import check_inference_windows
from weaktr_cli.windows import pass_size, reference_pass_sizes, window_starts

if TYPE_CHECKING:  # the writer (h5py) is imported when a split is predicted
    from weaktr_cli.per_image import PerImageRun

__all__ = [
    "OnnxModelInfo",
    "OnnxPredictSettings",
    "OnnxSegmenter",
    "predict_split_onnx",
    "read_onnx_info",
    "resize_bilinear",
    "resize_uint8_grid",
    "softmax",
]


def _session(path: Path, threads: int | None, providers: Sequence[str] | None) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise WeakTrError(
            "ONNX inference needs onnxruntime, which is not installed",
            hint="pip install 'weaktr[onnx]'",
        ) from exc

    if not path.is_file():
        raise WeakTrError(f"ONNX model {path} does not exist")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(
            str(path), options, providers=list(providers or ["CPUExecutionProvider"])
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeakTrError(f"onnxruntime cannot load {path}: {first}") from exc


def read_onnx_info(path: str | Path) -> OnnxModelInfo:
    """The parsed weaktr metadata of an ONNX file (any kind)."""
    path = Path(path)
    props = _session(path, 1, None).get_modelmeta().custom_metadata_map
    return OnnxModelInfo.from_metadata(props, source=str(path))


@dataclass(frozen=True)
class OnnxPredictSettings:
    """`weaktr_cli.predict.PredictSettings` without the torch-only fields.

    window / stride: sliding-window crop and step (None: the model's crop size, or the input
        size of a fixed export, and 2/3 of the window, as `settings_for_checkpoint`).
    scales, base_size, flip, layer_weights, crf, batch_size, procedure: as
        `PredictSettings`; `batch_size` applies to dynamic exports (fixed ones take their
        exported batch).
    """

    window: int | None = None
    stride: int | None = None
    scales: tuple[float, ...] = (1.0,)
    base_size: int | None = None
    flip: bool = True
    layer_weights: tuple[float, ...] | None = None
    crf: str | None = None
    batch_size: int = 4
    procedure: str = "weaktr"

    @classmethod
    def from_predict_settings(cls, values: Mapping[str, Any]) -> OnnxPredictSettings:
        """From `PredictSettings.to_dict()`; normalisation (in the graph) and precision (fp32)
        do not apply and are ignored."""
        names = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in values.items() if k in names}
        for key in ("scales", "layer_weights"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolved(self, info: OnnxModelInfo) -> OnnxPredictSettings:
        """These settings with window / stride filled in for `info`, checked against it."""
        if info.kind != "segmenter":
            raise WeakTrError(f"the ONNX model is a {info.kind!r} model, not a segmenter")
        default = info.input_size[0] if not info.dynamic else info.crop_size
        window = self.window if self.window is not None else default
        stride = self.stride if self.stride is not None else max(1, window * 2 // 3)
        out = replace(self, window=window, stride=stride)
        out._check(info)
        return out

    def _check(self, info: OnnxModelInfo) -> None:
        window, stride = self.window, self.stride
        assert window is not None and stride is not None
        check_inference_windows(window=window, stride=stride, scales=self.scales,
                                base_size=self.base_size, batch_size=self.batch_size,
                                layer_weights=self.layer_weights, crf=self.crf,
                                procedure=self.procedure)
        if info.dynamic:
            if window < max(info.min_size):
                raise WeakTrError(
                    f"window {window} is below the model's smallest input {info.min_size}"
                )
        elif info.input_size != (window, window):
            raise WeakTrError(
                f"this ONNX model takes fixed {info.input_size[0]}x{info.input_size[1]} "
                f"inputs; a {window} px window needs a {window}x{window} or a dynamic export",
                hint="omit --window, or re-export with --dynamic",
            )
        weights = self.layer_weights
        if weights is not None and len(weights) != info.layers:
            hint = ("re-export with all decoder layers (--all-layers)" if info.layers == 1
                    else "give one weight per decoder layer")
            raise WeakTrError(
                f"{len(weights)} layer weights, but the ONNX model outputs "
                f"{info.layers} decoder layer(s)", hint=hint,
            )


# ----------------------------------------------------------------------------- numerics


def _linear_taps(in_len: int, out_len: int, dtype: type[np.floating[Any]] = np.float32,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's bilinear resize (align_corners=False) along one
    axis, as torch's CPU kernel computes them for `dtype`: (i0, i1, w0, w1), each (out_len,).

    float32: the step is float32 in / out; the source coordinate step * (dst + 0.5) - 0.5 is
    one fused multiply-add in torch's kernel (a single float32 rounding), emulated here
    through float64, where the product of two float32 values is exact. float64: all float64.
    """
    dst = np.arange(out_len, dtype=np.float64) + 0.5
    if dtype == np.float64:
        src = np.maximum(in_len / out_len * dst - 0.5, 0.0)
    else:
        scale = np.float32(in_len) / np.float32(out_len)
        src = np.maximum((np.float64(scale) * dst - 0.5).astype(np.float32), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_len - 1)
    lam = np.clip(src - i0.astype(dtype), 0, 1).astype(dtype)
    i1 = i0 + (i0 < in_len - 1)
    return i0, i1, (dtype(1) - lam).astype(dtype), lam


def resize_bilinear(x: np.ndarray, size: tuple[int, int],
                    dtype: type[np.floating[Any]] = np.float32) -> np.ndarray:
    """Bilinear resize of (C, H, W) values to (C, *size) in `dtype` (float32 or float64),
    matching `F.interpolate(x[None], size, mode="bilinear", align_corners=False)` on a tensor
    of that dtype (no antialiasing)."""
    _, in_h, in_w = x.shape
    out_h, out_w = size
    if (out_h, out_w) == (in_h, in_w):
        return x.astype(dtype, copy=True)
    x = x.astype(dtype, copy=False)
    r0, r1, rw0, rw1 = _linear_taps(in_h, out_h, dtype)
    c0, c1, cw0, cw1 = _linear_taps(in_w, out_w, dtype)
    rows: np.ndarray = x[:, :, c0] * cw0 + x[:, :, c1] * cw1  # width first, as torch nests it
    out: np.ndarray = rows[:, r0, :] * rw0[:, None] + rows[:, r1, :] * rw1[:, None]
    return out


def resize_uint8_grid(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`weaktr_cli.test_time.resize_uint8_bilinear` without torch: bilinear resize of (3, H, W)
    0-255 values in float64, rounded half up with the same 1e-6 margin and clipped to 0-255;
    float32 (3, *size)."""
    if tuple(pixels.shape[1:]) == tuple(size):
        return pixels.astype(np.float32)
    out = resize_bilinear(pixels, size, np.float64)
    return np.clip(np.floor(out + (0.5 + 1e-6)), 0, 255).astype(np.float32)


def softmax(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Numerically stable softmax (float32)."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    out: np.ndarray = (e / e.sum(axis=axis, keepdims=True)).astype(np.float32, copy=False)
    return out


# ----------------------------------------------------------------------------- model


class OnnxSegmenter:
    """An exported weaktr segmenter run by onnxruntime.

    Args:
        path: the .onnx file (`weaktr export` of a segmenter checkpoint).
        threads: onnxruntime intra-op threads (None: onnxruntime's default, all cores).
        providers: onnxruntime execution providers (default CPU only).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None,
                 providers: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self._session = _session(self.path, threads, providers)
        props = self._session.get_modelmeta().custom_metadata_map
        self.info = OnnxModelInfo.from_metadata(props, source=str(self.path))
        if self.info.kind != "segmenter":
            raise WeakTrError(
                f"{self.path} is an exported {self.info.kind!r} model, not a segmenter",
                hint="predictions need an export of a retrain (segmenter) checkpoint",
            )

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    def settings(self, **overrides: Any) -> OnnxPredictSettings:
        """Default settings for this model (window = its crop, stride 2/3), with overrides."""
        return OnnxPredictSettings(**overrides).resolved(self.info)

    def run(self, pixels: np.ndarray) -> np.ndarray:
        """Raw model output for a batch of crops.

        Args:
            pixels: (B, 3, H, W) float32 RGB 0-255 (any B for dynamic exports; fixed exports
                are fed in chunks of their batch size, the last one padded).

        Returns:
            float32 logits (B, K, H, W), or (B, L, K, H, W) for an all-layers export.
        """
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise WeakTrError(f"expected pixels (B, 3, H, W), got {pixels.shape}")
        info = self.info
        if info.dynamic:
            if pixels.shape[2] < info.min_size[0] or pixels.shape[3] < info.min_size[1]:
                raise WeakTrError(
                    f"input {pixels.shape[2]}x{pixels.shape[3]} is below the model's smallest "
                    f"input {info.min_size[0]}x{info.min_size[1]}"
                )
            return self._run(pixels)
        if pixels.shape[2:] != info.input_size:
            raise WeakTrError(
                f"this ONNX model takes {info.input_size[0]}x{info.input_size[1]} inputs, "
                f"got {pixels.shape[2]}x{pixels.shape[3]}"
            )
        outs = []
        step = info.batch_size
        for start in range(0, pixels.shape[0], step):
            chunk = pixels[start : start + step]
            n = chunk.shape[0]
            if n < step:  # repeat the last crop; its extra outputs are dropped
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - n, axis=0)])
            outs.append(self._run(chunk)[:n])
        return np.concatenate(outs)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._session.run(
            [self.info.output_name], {self.info.input_name: batch}
        )[0]
        return out

    def _sliding_logits(self, pixels: np.ndarray, settings: OnnxPredictSettings,
                        layers: Sequence[int]) -> list[np.ndarray]:
        """Merged window logits of (3, H, W) pixels with H, W >= window: one float32
        (K, H, W) array per index in `layers` (output layers of the model, 0 = the first
        decoder layer of an all-layers export, the only one of a last-layer export)."""
        _, h, w = pixels.shape
        ws, stride = settings.window, settings.stride
        assert ws is not None and stride is not None
        boxes = [(y, x) for y in window_starts(h, ws, stride) for x in window_starts(w, ws, stride)]
        sums = np.zeros((len(layers), self.info.num_classes, h, w), dtype=np.float32)
        count = np.zeros((1, h, w), dtype=np.float32)
        step = settings.batch_size if self.info.dynamic else self.info.batch_size
        for start in range(0, len(boxes), step):
            chunk = boxes[start : start + step]
            crops = np.stack([pixels[:, y : y + ws, x : x + ws] for y, x in chunk])
            out = self.run(crops)
            outs = [out[:, k] for k in layers] if self.info.layers > 1 else [out]
            for k, logits in enumerate(outs):
                for i, (y, x) in enumerate(chunk):
                    sums[k][:, y : y + ws, x : x + ws] += logits[i]
            for y, x in chunk:
                count[:, y : y + ws, x : x + ws] += 1
        return [s / count for s in sums]

    def predict_probs(self, image: np.ndarray,
                      settings: OnnxPredictSettings | None = None) -> np.ndarray:
        """Class probabilities of one image.

        Args:
            image: RGB (H, W, 3) uint8.
            settings: see `OnnxPredictSettings` (default: `self.settings()`).

        Returns:
            float32 (K, H, W) softmax probabilities, K = len(class_names).
        """
        settings = (settings or OnnxPredictSettings()).resolved(self.info)
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise WeakTrError(
                f"expected an RGB (H, W, 3) uint8 image, got {image.shape} {image.dtype}"
            )
        if settings.procedure == "reference":
            return self._reference_probs(image, settings)
        assert settings.window is not None
        h, w = image.shape[:2]
        pixels = image.transpose(2, 0, 1).astype(np.float32)
        weights = settings.layer_weights
        mix = weights if weights is not None else (1.0,)
        used = range(self.info.layers) if weights is not None else [self.info.layers - 1]
        total = np.zeros((self.info.num_classes, h, w), dtype=np.float32)
        passes = 0
        for scale in settings.scales:
            size = pass_size(h, w, scale, settings.window, settings.base_size)
            scaled = np.clip(resize_bilinear(pixels, size), 0, 255)
            for flipped in (False, True) if settings.flip else (False,):
                view = scaled[:, :, ::-1] if flipped else scaled
                layers = self._sliding_logits(view, settings, used)
                for weight, logits in zip(mix, layers, strict=True):
                    if weight == 0:
                        continue
                    up = resize_bilinear(logits, (h, w))
                    if flipped:
                        up = up[:, :, ::-1]
                    total += np.float32(weight / sum(mix)) * softmax(up, axis=0)
                passes += 1
        probs: np.ndarray = (total / np.float32(passes)).astype(np.float32)
        return probs

    def _reference_probs(self, image: np.ndarray, settings: OnnxPredictSettings) -> np.ndarray:
        """`predict_probs` with the reference's procedure (`weaktr_cli.test_time`): float32
        (K, H, W) sum_k w_k P_k, not renormalised."""
        window, base_size = settings.window, settings.base_size
        assert window is not None and base_size is not None  # resolved() checked them
        h, w = image.shape[:2]
        weights = settings.layer_weights or (0.0,) * (self.info.layers - 1) + (1.0,)
        used = [k for k, wk in enumerate(weights) if wk != 0]
        pixels = image.transpose(2, 0, 1).astype(np.float64)
        total = np.zeros((len(used), self.info.num_classes, h, w), dtype=np.float32)
        views = 0
        for ratio in settings.scales:
            resized_size, fitted_size = reference_pass_sizes(h, w, ratio, base_size, window)
            resized = resize_uint8_grid(pixels, resized_size)
            for flipped in (False, True) if settings.flip else (False,):
                view = resized[:, :, ::-1] if flipped else resized
                if fitted_size != resized_size:
                    view = resize_bilinear(view, fitted_size)
                for k, logits in enumerate(self._sliding_logits(view, settings, used)):
                    up = resize_bilinear(logits, (h, w))
                    total[k] += softmax(up[:, :, ::-1] if flipped else up, axis=0)
                views += 1
        total /= np.float32(views)
        fused = sum((np.float32(weights[k]) * total[i] for i, k in enumerate(used)),
                    np.zeros_like(total[0]))
        return fused.astype(np.float32)

    def predict(self, image: np.ndarray,
                settings: OnnxPredictSettings | None = None) -> np.ndarray:
        """(H, W) uint8 class-id label map of an RGB (H, W, 3) uint8 image (argmax of
        `predict_probs`, CRF-refined when `settings.crf` names a preset)."""
        settings = (settings or OnnxPredictSettings()).resolved(self.info)
        return label_from_probs(self.predict_probs(image, settings), image, settings.crf,
                                renormalize=settings.procedure != "reference")


# ----------------------------------------------------------------------------- splits


def predict_split_onnx(
    path: str | Path,
    run: PerImageRun,
    settings: OnnxPredictSettings | None = None,
    *,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
) -> Path:
    """Predict every image of `run.dataset` (or of `run`'s shard) with an ONNX segmenter into
    a ``labels`` artifact at `run.out_path`; the ONNX file is recorded as its parent.

    `run`: the split and the artifact path, shard, resume and progress (`PerImageRun`; its
    device is not used: `providers` choose where onnxruntime runs). The model's class names
    must equal the dataset's. Ids already in a resumable `<out>.partial` made with the same
    settings and model are skipped. Returns the path.
    """
    from weaktr_cli.artifacts import Entry, file_sha256, new_meta

    dataset = run.dataset
    segmenter = OnnxSegmenter(path, threads=threads, providers=providers)
    settings = (settings or OnnxPredictSettings()).resolved(segmenter.info)
    names = segmenter.class_names
    check_class_names(f"the ONNX model {path}", names, dataset,
                      hint="use a model exported from a checkpoint trained on this dataset")
    config = {
        "settings": settings.to_dict(),
        "runtime": "onnxruntime",
        **run.config(),
        "onnx_sha256": file_sha256(path),
        "image_orientation": dataset.orientation,  # "exif" when EXIF rotations were applied
    }
    meta = new_meta("labels", dataset.name, dataset.split, names, config=config, parents=[path],
                    data_root=dataset.root)

    def produce(todo: list[str]) -> Iterator[tuple[str, Entry]]:
        for image_id in todo:
            image = dataset.load_image(image_id)
            yield image_id, label_from_probs(segmenter.predict_probs(image, settings), image,
                                             settings.crf,
                                             renormalize=settings.procedure != "reference")

    return run.write(meta, produce)
