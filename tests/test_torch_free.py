"""`weaktr crf` and `weaktr predict --onnx` never import torch, timm or torchvision.

Neither needs them, and importing them cost 8.4 s and 857 MB per call on a 2-core CPU (it also
kept two CRF workers from scaling). Each command runs in a fresh interpreter that reports the
heavy modules it loaded; crf with two workers (forked, since torch is absent) must also give
the seeds of one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from weaktr_cli.artifacts import ArtifactWriter, new_meta, open_artifact

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "torchvision")
PROBE = """
import sys
from weaktr_cli.commands.app import main
sys.argv = ["weaktr", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
print("HEAVY", [m for m in {heavy!r} if m in sys.modules], "CODE", code)
"""


def _run(*args: object) -> str:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *map(str, args),
                           "-q"], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.endswith("CODE 0") or last.endswith("CODE None"), proc.stderr[-2000:]
    return last


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from weaktr_cli.data.shapes import ShapesConfig, ensure_shapes

    config = ShapesConfig(num_train=6, num_val=3, num_test=0, image_size=32, seed=2)
    return ensure_shapes(config, cache_dir=tmp_path_factory.mktemp("shapes"))


def test_crf_imports_no_torch_and_two_workers_match_one(shapes_root: Path, tmp_path: Path
                                                        ) -> None:
    from weaktr_cli.data import open_dataset

    dataset = open_dataset("shapes", "train", shapes_root)
    cams = tmp_path / "cams.h5"
    rng = np.random.default_rng(0)
    meta = new_meta("cams", dataset.name, dataset.split, dataset.class_names)
    with ArtifactWriter(cams, meta) as writer:
        for image_id in dataset.ids:
            ids = dataset.image_labels(image_id)
            writer.write_cams(image_id, ids, rng.random((len(ids), 32, 32)).astype(np.float32))
        writer.finalize()
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"seeds{workers}.h5"
        assert _run("crf", "--cams", cams, "--data-root", shapes_root, "--workers", workers,
                    "--out", out).startswith("HEAVY []")
        with open_artifact(out) as reader:
            outputs.append({i: reader.read_labels(i) for i in reader.ids})
    assert outputs[0].keys() == set(dataset.ids)
    for image_id, label in outputs[0].items():
        np.testing.assert_array_equal(label, outputs[1][image_id])


def test_predict_onnx_imports_no_torch(shapes_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
    import torch

    from weaktr_cli.data import open_dataset
    from weaktr_cli.export import export_onnx
    from weaktr_cli.models.segmenter import build_segmenter

    names = open_dataset("shapes", "val", shapes_root).class_names
    torch.manual_seed(0)
    model = build_segmenter(len(names), "micro", img_size=32, decoder_dropout=0.0).eval()
    onnx_path = tmp_path / "model.onnx"
    export_onnx(model, onnx_path, kind="segmenter", class_names=tuple(names), dynamic=True)
    out = tmp_path / "preds.h5"
    assert _run("predict", "--onnx", onnx_path, "--data", "shapes", "--data-root", shapes_root,
                "--split", "val", "--out", out, "--png-dir", tmp_path / "png"
                ).startswith("HEAVY []")
    with open_artifact(out) as reader:
        assert len(reader) == 3 and reader.meta.class_names == tuple(names)
    assert len(list((tmp_path / "png").glob("*.png"))) == 3
