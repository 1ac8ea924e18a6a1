"""`--reference-checkpoint` on predict, evaluate and export-onnx, on the real VOC samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.cli_helpers import run_cli
from tests.reference_transcription import (
    DEIT_MEAN_255,
    DEIT_STD_255,
    RefSegmenter,
    randomize,
    ref_crf_labels,
    ref_inference,
)

pytestmark = [pytest.mark.shared_data, pytest.mark.usefixtures("one_torch_thread")]

VARIANT = ("dataset_kwargs:\n  crop_size: 480\n  image_size: 520\n  normalization: deit\n"
           "inference_kwargs:\n  window_size: 480\n  window_stride: 320\n")


@pytest.fixture(scope="module")
def reference_ckpt(tmp_path_factory):
    """A tiny reference-layout VOC segmenter (patch 32, width 64, 480 crop) + its variant.yml."""
    folder = tmp_path_factory.mktemp("reference")
    torch.manual_seed(0)
    model = randomize(RefSegmenter(n_cls=21, image_size=480, patch=32, depth=1, dim=64), 5)
    path = folder / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "n_cls": 21, "epoch": 99}, path)
    (folder / "variant.yml").write_text(VARIANT)
    return model.eval(), path


def test_predict_reference_checkpoint_equals_the_reference_procedure(
        capsys, tmp_path, voc_sample, reference_ckpt) -> None:
    ref, path = reference_ckpt
    out = tmp_path / "preds.h5"
    result = run_cli(capsys, "predict", "--reference-checkpoint", path, "--data", "voc",
                     "--data-root", voc_sample, "--split", "val", "--shard", "1/5", "--out", out,
                     "--json")
    assert result.code == 0, result.stderr
    from weaktr_cli.artifacts import open_artifact

    with open_artifact(out) as reader:
        image_id = reader.ids[0]
        got = reader.read_labels(image_id)
        config = reader.meta.config["settings"]
    assert config["procedure"] == "reference" and config["base_size"] == 520
    assert config["crf"] == "voc-test" and config["layer_weights"] == [0.8, 1.0]
    image = np.asarray(Image.open(voc_sample / "JPEGImages" / f"{image_id}.jpg").convert("RGB"))
    fused, _ = ref_inference(ref, image, ratios=(1.0,), flip=False, im_size=520, window=480,
                             stride=320, mean255=DEIT_MEAN_255, std255=DEIT_STD_255)
    expected = ref_crf_labels(image, fused, gaussian=(3, 3), bilateral=(83, 5, 3))
    np.testing.assert_array_equal(got, expected)


def test_reference_checkpoint_errors_are_one_line(capsys, tmp_path, voc_sample,
                                                  reference_ckpt) -> None:
    _, path = reference_ckpt
    state = torch.load(path)["model"]
    del state["decoder.mask_norm.bias"]
    broken = tmp_path / "broken.pth"
    torch.save({"model": state}, broken)
    result = run_cli(capsys, "predict", "--reference-checkpoint", broken,
                     "--reference-normalization", "deit", "--data", "voc", "--data-root",
                     voc_sample, "--split", "val", "--out", tmp_path / "p.h5")
    assert result.code != 0
    assert "missing key(s): decoder.mask_norm.bias" in result.stderr
    assert "Traceback" not in result.stderr
    # No variant.yml beside it and no --reference-normalization: the normalisation is unknown.
    result = run_cli(capsys, "predict", "--reference-checkpoint", broken.with_name("x.pth"),
                     "--data", "voc", "--data-root", voc_sample, "--out", tmp_path / "q.h5")
    assert result.code != 0 and "Traceback" not in result.stderr
    state = torch.load(path)["model"]
    torch.save({"model": state}, tmp_path / "alone.pth")
    result = run_cli(capsys, "predict", "--reference-checkpoint", tmp_path / "alone.pth",
                     "--data", "voc", "--data-root", voc_sample, "--out", tmp_path / "r.h5")
    assert result.code != 0 and "--reference-normalization" in result.stderr


def test_export_onnx_from_a_reference_checkpoint(capsys, tmp_path, reference_ckpt) -> None:
    pytest.importorskip("onnxruntime")
    _, path = reference_ckpt
    out = tmp_path / "ref.onnx"
    result = run_cli(capsys, "export-onnx", "--reference-checkpoint", path, "--out", out,
                     "--height", "96", "--width", "128", "--json")
    assert result.code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert out.is_file()
    assert all(check["max_abs_diff"] <= 1e-4 for check in payload["checks"])


def test_inspect_describes_a_reference_checkpoint(capsys, reference_ckpt) -> None:
    _, path = reference_ckpt
    result = run_cli(capsys, "inspect", path, "--json")
    assert result.code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["format"] == "reference-checkpoint"
    assert (payload["embed_dim"], payload["depth"], payload["patch_size"]) == (64, 1, 32)
    assert (payload["n_cls"], payload["decoder_layers"], payload["img_size"]) == (21, 2, 480)
    assert payload["dataset"] == "voc" and payload["normalization"] == "deit"
    result = run_cli(capsys, "inspect", path)
    assert result.code == 0 and "--reference-checkpoint" in result.stdout
