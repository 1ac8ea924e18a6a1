"""The `crf` and `predict --onnx` paths never load torch (or timm / torchvision): they must run
where only numpy, h5py, pydensecrf and onnxruntime are installed, and start fast."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from weaktr_cli.artifacts import ArtifactWriter, new_meta, open_artifact
from weaktr_cli.data.shapes import ShapesConfig, ensure_shapes, open_shapes

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "torchvision")


def _loaded_heavy(code: str) -> list[str]:
    probe = (f"{code}\nimport sys\nprint('HEAVY:' + ','.join(sorted(m for m in sys.modules "
             f"if m.split('.')[0] in {HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("HEAVY:"))
    return [m for m in line[len("HEAVY:"):].split(",") if m]


def test_command_modules_and_recipes_import_without_torch() -> None:
    assert _loaded_heavy(
        "import weaktr_cli.commands.app, weaktr_cli.commands.crf, weaktr_cli.commands.predict\n"
        "import weaktr_cli.phases, weaktr_cli.seeds, weaktr_cli.onnx_infer, weaktr_cli.settings\n"
        "from weaktr_cli.recipes import recipe_for_dataset, resolve\n"
        "resolve('seeds', recipe_for_dataset('voc')).bg\n"
        "resolve('predict', recipe_for_dataset('shapes'), flip=False).check()\n"
        "resolve('dump', 'shapes').check()\n") == []


def test_making_seeds_never_imports_torch(tmp_path: Path) -> None:
    root = ensure_shapes(ShapesConfig(num_train=3, num_val=1, image_size=32, seed=2),
                         cache_dir=tmp_path / "data")
    dataset = open_shapes("train", root)
    cams = tmp_path / "cams.h5"
    rng = np.random.default_rng(0)
    meta = new_meta("cams", dataset.name, dataset.split, dataset.class_names, seed=0)
    with ArtifactWriter(cams, meta, resume=False) as writer:
        for image_id in dataset.ids:
            present = dataset.image_labels(image_id)
            h, w = dataset.load_image(image_id).shape[:2]
            writer.write_cams(image_id, present, rng.random((len(present), h, w), np.float32))
        writer.finalize()
    out = tmp_path / "seeds.h5"
    assert _loaded_heavy(
        "from pathlib import Path\nfrom weaktr_cli.phases import crf_run\n"
        f"crf_run(cams=Path({str(cams)!r}), data=None, data_root=Path({str(root)!r}), "
        f"out=Path({str(out)!r}), bg=None, preset=None, no_crf=True, unary='hard', "
        "ignore_disagreement=False, crf_overrides={})\n") == []
    with open_artifact(out, kind="labels") as reader:
        assert reader.ids == dataset.ids
