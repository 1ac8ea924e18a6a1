"""ONNX export (verified against PyTorch) and torch-free onnxruntime inference.

Four real exports of `micro` models (segmenter and CAM, fixed and dynamic) are shared by the
module; one more export checks that a graph disagreeing with PyTorch is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests._tiny_data import CLASS_NAMES, TinyDataset
from weaktr_cli.artifacts import file_sha256, open_artifact
from weaktr_cli.checkpoints import save_checkpoint
from weaktr_cli.data.loader import IMAGENET_MEAN, IMAGENET_STD, normalize
from weaktr_cli.errors import WeakTrError
from weaktr_cli.export import (
    METADATA_KEYS,
    CamExport,
    ExportReport,
    export_checkpoint,
    export_onnx,
    verify_onnx,
)
from weaktr_cli.models.cam_vit import CAM_VARIANTS, WeakTrCAM, cam_maps
from weaktr_cli.models.registry import get_arch
from weaktr_cli.models.segmenter import Segmenter, build_segmenter
from weaktr_cli.onnx_infer import (
    OnnxPredictSettings,
    OnnxSegmenter,
    read_onnx_info,
    resize_bilinear,
)
from weaktr_cli.predict import PredictSettings, predict_probs

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")

REPO = Path(__file__).resolve().parents[1]
N_CLS = len(CLASS_NAMES)  # background + 3
CROP = 32  # micro: patch 8, positional embedding for 32 px
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def seg_model(_one_thread) -> Segmenter:
    torch.manual_seed(0)
    return build_segmenter(N_CLS, "micro", img_size=CROP, decoder_dropout=0.0).eval()


@pytest.fixture(scope="module")
def cam_model(_one_thread) -> WeakTrCAM:
    torch.manual_seed(1)
    # aaf-feat: the fusion that also reads the attention-branch outputs
    return WeakTrCAM("micro", N_CLS - 1, fusion="aaf-feat", aaf_reduction=2).eval()


@pytest.fixture(scope="module")
def seg_dynamic(seg_model: Segmenter, out_dir: Path) -> ExportReport:
    """Dynamic batch / H / W, every decoder layer in the output, ImageNet normalisation."""
    return export_onnx(
        seg_model, out_dir / "seg-dynamic.onnx", kind="segmenter", class_names=CLASS_NAMES,
        dynamic=True, all_layers=True, metadata={"checkpoint": "tiny.safetensors", "step": 7},
    )


@pytest.fixture(scope="module")
def seg_fixed(seg_model: Segmenter, out_dir: Path) -> ExportReport:
    """Through a checkpoint (inception normalisation): fixed 2 x 3 x 32 x 32 input."""
    spec = dataclasses.asdict(get_arch("micro"))
    meta = {
        "kind": "segmenter",
        "class_names": list(CLASS_NAMES),
        "model": {"arch": "micro", "encoder": spec, "n_cls": N_CLS, "img_size": CROP,
                  "drop_path_rate": 0.0, "decoder_layers": 2, "decoder_dropout": 0.0,
                  "normalization": "inception"},
        "recipe": "shapes",  # one test time, the last decoder layer: a last-layer export
    }
    ckpt = save_checkpoint(out_dir / "seg.safetensors", seg_model.state_dict(), meta)
    return export_checkpoint(ckpt, out_dir / "seg-fixed.onnx", batch_size=2)


@pytest.fixture(scope="module")
def cam_dynamic(cam_model: WeakTrCAM, out_dir: Path) -> ExportReport:
    return export_onnx(cam_model, out_dir / "cam-dynamic.onnx", kind="cam",
                       class_names=CLASS_NAMES, dynamic=True, height=40, width=48)


@pytest.fixture(scope="module")
def cam_fixed(cam_model: WeakTrCAM, out_dir: Path) -> ExportReport:
    meta = {"kind": "cam", "model": cam_model.config(), "class_names": list(CLASS_NAMES)}
    ckpt = save_checkpoint(out_dir / "cam.safetensors", cam_model.state_dict(), meta)
    return export_checkpoint(ckpt, out_dir / "cam-fixed.onnx", variant="cross")


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _input_dims(path: Path) -> list[int | str]:
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]


def _pixels(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.float32)


def _normalised(pixels: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (torch.from_numpy(pixels) / 255.0 - m) / s


# ----------------------------------------------------------------------------- export


def test_segmenter_dynamic_export(seg_dynamic: ExportReport, seg_model: Segmenter):
    path = seg_dynamic.path
    onnx.checker.check_model(str(path), full_check=True)
    assert _input_dims(path) == ["batch", 3, "height", "width"]
    assert seg_dynamic.output_shape == (-1, 2, N_CLS, -1, -1)  # (B, L, K, H, W)
    # verified at the exported shape and at another batch and a non-multiple of the patch
    (first, second) = seg_dynamic.checks
    assert first.shape == (2, 3, CROP, CROP)
    assert second.shape[0] != 2 and second.shape[2] % 8 and second.shape[3] % 8
    assert seg_dynamic.max_abs_diff <= 1e-4
    assert all(c.max_abs_ref > 0.1 for c in seg_dynamic.checks)  # real logits were compared
    # and independently of verify_onnx, at a third shape
    pixels = _pixels((3, 3, 50, 41), seed=5)
    got = _session(path).run(None, {"pixels": pixels})[0]
    with torch.inference_mode():
        expected = torch.stack(seg_model.forward_layers(_normalised(pixels)), dim=1).numpy()
    assert got.shape == (3, 2, N_CLS, 50, 41)
    assert np.abs(got - expected).max() <= 1e-4


def test_segmenter_fixed_export(seg_fixed: ExportReport, seg_model: Segmenter):
    onnx.checker.check_model(str(seg_fixed.path), full_check=True)
    assert _input_dims(seg_fixed.path) == [2, 3, CROP, CROP]
    assert seg_fixed.output_shape == (2, N_CLS, CROP, CROP)
    assert len(seg_fixed.checks) == 1 and seg_fixed.max_abs_diff <= 1e-4
    with pytest.raises(Exception, match="dimensions"):
        _session(seg_fixed.path).run(None, {"pixels": _pixels((2, 3, 40, 40), seed=0)})
    # OnnxSegmenter feeds 3 crops as two batches of 2 (the last one padded)
    pixels = _pixels((3, 3, CROP, CROP), seed=6)
    got = OnnxSegmenter(seg_fixed.path, threads=1).run(pixels)
    with torch.inference_mode():
        expected = seg_model(_normalised(pixels, *INCEPTION)).numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4


def test_metadata_round_trip(seg_dynamic: ExportReport, seg_fixed: ExportReport,
                             cam_dynamic: ExportReport, out_dir: Path):
    props = {p.key: p.value for p in onnx.load(str(seg_dynamic.path)).metadata_props}
    # no CAM variant, no recipe: `export_onnx` was given none
    assert set(props) == set(METADATA_KEYS) - {"weaktr.cam_variant", "weaktr.recipe"}
    assert props == seg_dynamic.metadata
    assert json.loads(json.dumps(seg_dynamic.to_dict()))["max_abs_diff"] <= 1e-4
    info = read_onnx_info(seg_dynamic.path)
    assert info.kind == "segmenter" and info.class_names == CLASS_NAMES
    assert info.mean == pytest.approx(IMAGENET_MEAN) and info.std == pytest.approx(IMAGENET_STD)
    assert (info.patch_size, info.crop_size, info.input_size) == (8, CROP, (CROP, CROP))
    assert info.dynamic and info.layers == 2 and info.min_size == (9, 9)
    assert info.extra == {"checkpoint": "tiny.safetensors", "step": 7} and info.recipe is None
    assert json.loads(props["weaktr.input"])["layout"] == "B, 3, H, W"
    fixed = read_onnx_info(seg_fixed.path)
    assert not fixed.dynamic and fixed.batch_size == 2 and fixed.layers == 1
    assert fixed.recipe == "shapes"  # the checkpoint's training recipe
    assert fixed.mean == pytest.approx(INCEPTION[0])  # the checkpoint's normalisation
    assert fixed.extra["checkpoint_sha256"] == file_sha256(out_dir / "seg.safetensors")
    cam = read_onnx_info(cam_dynamic.path)
    assert cam.kind == "cam" and cam.cam_variant == "fine" and cam.min_size == (16, 16)
    assert cam.input_size == (40, 48)


def test_cam_exports(cam_dynamic: ExportReport, cam_fixed: ExportReport, cam_model: WeakTrCAM):
    for report in (cam_dynamic, cam_fixed):
        onnx.checker.check_model(str(report.path), full_check=True)
        assert report.max_abs_diff <= 1e-4
        # CAMs are small numbers: the difference must also be small relative to them
        assert all(c.max_abs_diff <= 1e-4 * c.max_abs_ref for c in report.checks)
    assert _input_dims(cam_dynamic.path) == ["batch", 3, "height", "width"]
    assert _input_dims(cam_fixed.path) == [1, 3, 32, 32]  # the arch's input size
    assert cam_dynamic.checks[0].shape == (2, 3, 40, 48)
    assert len(cam_dynamic.checks) == 2 and cam_fixed.output_shape == (1, N_CLS - 1, 4, 4)
    # a third size, grid equal to the stored 4 x 4 in one axis only, against cam_maps itself
    for path, variant, shape in ((cam_dynamic.path, "fine", (1, 3, 35, 61)),
                                 (cam_fixed.path, "cross", (1, 3, 32, 32))):
        pixels = _pixels(shape, seed=8)
        got = _session(path).run(None, {"pixels": pixels})[0]
        with torch.inference_mode():
            expected = cam_maps(cam_model, _normalised(pixels), variant).numpy()
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("fusion", ["aaf", "aaf-feat", "mean-sum"])
def test_cam_export_wrapper_equals_cam_maps(fusion: str):
    # CamExport re-writes the forward pass for tracing; eagerly it must be cam_maps exactly
    # (up to float rounding), at the stored grid (4 x 4), one axis off it, and odd sizes.
    torch.manual_seed(2)
    model = WeakTrCAM("micro", 3, fusion=fusion, aaf_reduction=2).eval()
    for variant in CAM_VARIANTS:
        wrapper = CamExport(model, variant).eval()
        for shape in [(2, 3, 32, 32), (1, 3, 32, 57), (2, 3, 19, 44)]:
            pixels = torch.from_numpy(_pixels(shape, seed=3))
            with torch.inference_mode():
                got = wrapper(pixels)
                expected = cam_maps(model, normalize(pixels), variant)
            scale = float(expected.abs().max())
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)


def test_verify_names_the_difference_above_atol(seg_dynamic: ExportReport, seg_model: Segmenter):
    other = copy.deepcopy(seg_model)
    with torch.no_grad():
        other.decoder.mask_norm.bias += 0.01  # shifts every logit by 0.01

    def reference(pixels: torch.Tensor) -> torch.Tensor:
        return torch.stack(other.forward_layers(_normalised(pixels.numpy())), dim=1)

    with pytest.raises(WeakTrError, match=r"differ by 0\.01.* above the tolerance 0\.0001"):
        verify_onnx(seg_dynamic.path, reference, [(1, 3, 24, 24)])
    checks = verify_onnx(seg_dynamic.path, reference, [(1, 3, 24, 24)], atol=0.02)
    assert checks[0].max_abs_diff == pytest.approx(0.01, rel=1e-3)


class _ShiftWhenExporting(nn.Module):
    """Adds 1 to its input only while torch.export traces: the graph disagrees with eager."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return y + 1.0 if torch.compiler.is_exporting() else y


def test_failed_verification_raises_and_leaves_nothing(seg_model: Segmenter, tmp_path: Path):
    model = copy.deepcopy(seg_model)
    model.decoder.mask_norm = _ShiftWhenExporting(model.decoder.mask_norm)
    with pytest.raises(WeakTrError, match=r"differ by 1(\.0+)?\b.*tolerance"):
        export_onnx(model, tmp_path / "bad.onnx", kind="segmenter", class_names=CLASS_NAMES)
    assert list(tmp_path.iterdir()) == []  # neither the model nor its temp file


def test_export_argument_errors(seg_model: Segmenter, cam_model: WeakTrCAM, tmp_path: Path):
    out = tmp_path / "x.onnx"
    with pytest.raises(WeakTrError, match="3 class names for a cam model of 4 classes"):
        export_onnx(cam_model, out, kind="cam", class_names=CLASS_NAMES[:3])
    with pytest.raises(WeakTrError, match="below the smallest input 16x16"):
        export_onnx(cam_model, out, kind="cam", class_names=CLASS_NAMES, height=12, width=32)
    with pytest.raises(WeakTrError, match="needs a Segmenter"):
        export_onnx(cam_model, out, kind="segmenter", class_names=CLASS_NAMES)
    with pytest.raises(WeakTrError, match="unknown export kind"):
        export_onnx(seg_model, out, kind="mask", class_names=CLASS_NAMES)
    with pytest.raises(WeakTrError, match="opset 17"):
        export_onnx(seg_model, out, kind="segmenter", class_names=CLASS_NAMES, opset=17)
    with pytest.raises(WeakTrError, match="unknown CAM variant"):
        export_onnx(cam_model, out, kind="cam", class_names=CLASS_NAMES, variant="finest")
    assert not out.exists()


# ----------------------------------------------------------------------------- inference


@pytest.mark.parametrize(
    ("size", "out"),
    [((20, 30), (33, 47)), ((45, 61), (17, 23)), ((32, 32), (32, 32)), ((7, 50), (64, 9))],
)
def test_resize_bilinear_matches_torch(size: tuple[int, int], out: tuple[int, int]):
    x = _pixels((3, *size), seed=0)
    expected = F.interpolate(torch.from_numpy(x)[None], size=out, mode="bilinear",
                             align_corners=False)[0].numpy()
    # a few float32 ulps at 255 (torch's kernel fuses multiply-adds)
    np.testing.assert_allclose(resize_bilinear(x, out), expected, rtol=0, atol=1e-4)


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(0) == b.argmax(0)).mean())


@pytest.mark.parametrize("which", ["dynamic", "fixed"])
def test_onnx_predictions_match_torch(which: str, seg_dynamic: ExportReport,
                                      seg_fixed: ExportReport, seg_model: Segmenter):
    report, norm = (seg_dynamic, "imagenet") if which == "dynamic" else (seg_fixed, "inception")
    segmenter = OnnxSegmenter(report.path, threads=1)
    rng = np.random.default_rng(11)
    # below the window (upsampled), several windows in both axes, a long strip
    images = [rng.integers(0, 256, size=s, dtype=np.uint8)
              for s in [(20, 27, 3), (57, 75, 3), (33, 110, 3)]]
    weights = [None, (0.8, 1.0)] if which == "dynamic" else [None]
    for layer_weights in weights:
        torch_settings = PredictSettings(window=CROP, stride=21, scales=(1.0, 1.25), flip=True,
                                         layer_weights=layer_weights, normalization=norm,
                                         precision="fp32", batch_size=3)
        settings = OnnxPredictSettings.from_predict_settings(torch_settings.to_dict())
        for image in images:
            expected = predict_probs(seg_model, image, torch_settings, "cpu")
            got = segmenter.predict_probs(image, settings)
            assert got.shape == expected.shape and got.dtype == np.float32
            assert np.abs(got - expected).max() <= 1e-4
            assert _agreement(got, expected) >= 0.9999
            labels = segmenter.predict(image, settings)
            assert labels.dtype == np.uint8 and np.array_equal(labels, got.argmax(0))


def test_resize_uint8_grid_matches_torch():
    from weaktr_cli.onnx_infer import resize_uint8_grid
    from weaktr_cli.test_time import resize_uint8_bilinear

    for size, out in [((20, 30), (33, 47)), ((45, 61), (17, 23)), ((32, 40), (520, 650))]:
        x = _pixels((3, *size), seed=3)
        expected = resize_uint8_bilinear(torch.from_numpy(x)[None], out)[0].numpy()
        assert np.array_equal(resize_uint8_grid(x.astype(np.float64), out), expected)


def test_onnx_runs_the_reference_procedure_as_torch_does(seg_dynamic: ExportReport,
                                                         seg_model: Segmenter):
    """The reference's test time (`test_time`) through onnxruntime: multi-scale ratios whose
    views are smaller than the window (upsampled after normalising) and larger, flips, the
    un-normalised 0.8 P1 + P2, and the last layer alone."""
    segmenter = OnnxSegmenter(seg_dynamic.path, threads=1)
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in [(20, 27, 3), (45, 38, 3)]]
    for layer_weights, flip in [((0.8, 1.0), True), (None, False)]:
        torch_settings = PredictSettings(window=CROP, stride=21, scales=(0.5, 1.0, 1.25),
                                         base_size=40, flip=flip, layer_weights=layer_weights,
                                         precision="fp32", procedure="reference")
        settings = OnnxPredictSettings.from_predict_settings(torch_settings.to_dict())
        assert settings.procedure == "reference"
        for image in images:
            expected = predict_probs(seg_model, image, torch_settings, "cpu")
            got = segmenter.predict_probs(image, settings)
            assert got.shape == expected.shape and got.dtype == np.float32
            if layer_weights is not None:  # fused without renormalising, as the reference
                np.testing.assert_allclose(got.sum(0), 1.8, atol=1e-4)
            assert np.abs(got - expected).max() <= 1e-4
            assert _agreement(got, expected) >= 0.9999


def test_onnx_inference_imports_no_torch(seg_dynamic: ExportReport, seg_model: Segmenter,
                                         tmp_path: Path):
    out = tmp_path / "pred.h5"
    script = textwrap.dedent(f"""
        import sys
        from weaktr_cli.onnx_infer import OnnxSegmenter, predict_split_onnx
        from weaktr_cli.per_image import PerImageRun
        from tests._tiny_data import TinyDataset
        path = {str(seg_dynamic.path)!r}
        import numpy as np
        image = np.zeros((30, 40, 3), np.uint8)
        assert OnnxSegmenter(path, threads=1).predict(image).shape == (30, 40)
        predict_split_onnx(path, PerImageRun(TinyDataset(n=3), {str(out)!r}), threads=1)
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print("TORCH:" + ",".join(loaded))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "TORCH:\n" in run.stdout, run.stdout  # no torch module was imported
    # the labels artifact agrees with the torch predictor (default settings: window = crop,
    # stride 2/3 of it, flip, one scale, last layer)
    dataset = TinyDataset(n=3)
    torch_settings = PredictSettings(window=CROP, stride=CROP * 2 // 3, precision="fp32")
    with open_artifact(out, kind="labels") as reader:
        assert reader.ids == dataset.ids
        assert reader.meta.class_names == CLASS_NAMES
        assert reader.meta.config["onnx_sha256"] == file_sha256(seg_dynamic.path)
        assert reader.meta.parents[0]["sha256"] == file_sha256(seg_dynamic.path)
        for image_id in dataset.ids:
            expected = predict_probs(seg_model, dataset.load_image(image_id), torch_settings,
                                     "cpu").argmax(0)
            assert (reader.read_labels(image_id) == expected).mean() >= 0.9999


def test_onnx_settings_errors(seg_fixed: ExportReport, seg_dynamic: ExportReport,
                              cam_fixed: ExportReport):
    fixed = OnnxSegmenter(seg_fixed.path, threads=1)
    assert fixed.settings().window == CROP and fixed.settings().stride == CROP * 2 // 3
    with pytest.raises(WeakTrError, match="fixed 32x32 inputs"):
        fixed.settings(window=40)
    with pytest.raises(WeakTrError, match="outputs 1 decoder layer") as err:
        fixed.settings(layer_weights=(0.8, 1.0))
    assert "--all-layers" in str(err.value)
    dynamic = OnnxSegmenter(seg_dynamic.path, threads=1)
    assert dynamic.settings(window=48).window == 48
    with pytest.raises(WeakTrError, match="stride 40 is larger than the window 32"):
        dynamic.settings(stride=40)
    with pytest.raises(WeakTrError, match="3 layer weights"):
        dynamic.settings(layer_weights=(1.0, 1.0, 1.0))
    with pytest.raises(WeakTrError, match="not a segmenter"):
        OnnxSegmenter(cam_fixed.path)
    with pytest.raises(WeakTrError, match="uint8"):
        dynamic.predict(np.zeros((30, 40, 3), np.float32))
    with pytest.raises(WeakTrError, match="does not exist"):
        OnnxSegmenter(seg_fixed.path.with_name("missing.onnx"))
