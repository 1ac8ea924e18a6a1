"""dump-cams pairs a checkpoint with a dataset only when its class names are the dataset's
(docs/RELIABILITY.md 14.10), and resumes an interrupted dump to the same artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.cli_helpers import run_cli
from weaktr_cli.artifacts import open_artifact
from weaktr_cli.cams import CamSettings, dump_cams
from weaktr_cli.checkpoints import save_checkpoint
from weaktr_cli.data.shapes import ShapesConfig, ensure_shapes, open_shapes
from weaktr_cli.models.cam_vit import WeakTrCAM
from weaktr_cli.per_image import PerImageRun
from weaktr_cli.train_cam import load_cam_model


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = ShapesConfig(num_train=6, num_val=2, image_size=32, seed=3)
    return ensure_shapes(config, cache_dir=tmp_path_factory.mktemp("shapes"))


def _checkpoint(path: Path, class_names: list[str]) -> Path:
    model = WeakTrCAM("micro", len(class_names) - 1)
    meta = {"kind": "cam", "model": model.config(), "class_names": class_names,
            "dataset": "shapes", "train_split": "train", "train": {"seed": 0}}
    return save_checkpoint(path, model.state_dict(), meta)


def test_class_names_must_be_the_datasets(capsys, shapes_root: Path, tmp_path: Path) -> None:
    names = list(open_shapes("train", shapes_root).class_names)
    renamed = [*names[:-1], "not-" + names[-1]]  # same count, another last class
    ckpt = _checkpoint(tmp_path / "other.ckpt", renamed)
    out = tmp_path / "cams.h5"
    result = run_cli(capsys, "dump-cams", "--checkpoint", ckpt, "--data-root", shapes_root,
                     "--out", out)
    assert result.code == 1
    assert "other class names" in result.stderr and repr("not-" + names[-1]) in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2  # the error and its hint
    assert not out.exists() and not out.with_name("cams.h5.partial").exists()
    # the same checkpoint with the dataset's names dumps
    good = _checkpoint(tmp_path / "good.ckpt", names)
    assert run_cli(capsys, "dump-cams", "--checkpoint", good, "--data-root", shapes_root,
                   "--out", out, "-q").code == 0


class _Interrupt(Exception):
    pass


def test_interrupted_dump_resumes_to_the_same_cams(shapes_root: Path, tmp_path: Path,
                                                   one_torch_thread: None) -> None:
    names = list(open_shapes("train", shapes_root).class_names)
    ckpt = _checkpoint(tmp_path / "cam.ckpt", names)
    model, _ = load_cam_model(ckpt)
    dataset = open_shapes("train", shapes_root)
    settings = CamSettings(scales=(1.0,), flip=True, variant="cross", batch_size=1,
                           precision="fp32")
    clean = dump_cams(model, PerImageRun(dataset, tmp_path / "clean.h5", resume=False),
                      settings=settings, checkpoint=ckpt)

    def stop_after_three(done: int, _total: int) -> None:
        if done == 3:
            raise _Interrupt

    out = tmp_path / "cams.h5"
    with pytest.raises(_Interrupt):
        dump_cams(model, PerImageRun(dataset, out, progress=stop_after_three),
                  settings=settings, checkpoint=ckpt)
    assert not out.exists() and out.with_name("cams.h5.partial").exists()
    seen: list[int] = []
    dump_cams(model, PerImageRun(dataset, out, progress=lambda done, _total: seen.append(done)),
              settings=settings, checkpoint=ckpt)
    # the three images of the partial file were kept, not recomputed
    assert min(seen) == 3 and seen[-1] == len(dataset.ids)
    with open_artifact(clean) as a, open_artifact(out) as b:
        assert list(b.ids) == list(a.ids) == list(dataset.ids)
        for image_id in a.ids:
            np.testing.assert_array_equal(a.read_cams(image_id).maps,
                                          b.read_cams(image_id).maps)
