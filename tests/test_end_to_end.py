"""Every command once, chained through their artifacts, on a tiny generated shapes dataset.

Uses the `smoke` recipe (micro ViT, a few steps): this checks the plumbing, the artifacts'
provenance chain and the CLI contracts, not accuracy (benchmarks and `weaktr pipeline` do that).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cli_helpers import run_cli
from weaktr_cli.artifacts import open_artifact

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from weaktr_cli.data.shapes import ShapesConfig, ensure_shapes

    config = ShapesConfig(num_train=24, num_val=8, num_test=6, image_size=32, seed=3)
    return ensure_shapes(config, cache_dir=tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def chain(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """train-cam -> dump-cams -> crf -> retrain -> predict, through the real CLI entry point."""
    capsys = _Capture()
    work = tmp_path_factory.mktemp("chain")
    root = ["--data-root", str(tiny_shapes)]
    paths = {name: work / name for name in
             ("cam.ckpt", "cams.h5", "seeds.h5", "seg.ckpt", "preds.h5", "model.onnx")}
    steps = [
        ["train-cam", "--data", "shapes", *root, "--recipe", "smoke",
         "--out", paths["cam.ckpt"]],
        ["dump-cams", "--checkpoint", paths["cam.ckpt"], *root, "--out", paths["cams.h5"]],
        ["crf", "--cams", paths["cams.h5"], *root, "--out", paths["seeds.h5"]],
        ["retrain", "--seeds", paths["seeds.h5"], *root, "--recipe", "smoke",
         "--out", paths["seg.ckpt"]],
        ["predict", "--checkpoint", paths["seg.ckpt"], *root, "--split", "val",
         "--precision", "fp32", "--out", paths["preds.h5"]],
    ]
    for args in steps:
        result = capsys.run(*args, "--quiet")
        assert result.code == 0, (args[0], result.stderr)
        # stdout carries exactly the artifact path, for $(...) pipelines
        assert result.stdout.strip() == str(args[args.index("--out") + 1]), args[0]
    return paths


class _Capture:
    """run_cli for module-scoped fixtures (pytest's capsys is function-scoped)."""

    def run(self, *args: object):  # type: ignore[no-untyped-def]
        import contextlib
        import io

        from tests.cli_helpers import Result
        from weaktr_cli.commands.app import main

        out, err = io.StringIO(), io.StringIO()
        argv = sys.argv
        sys.argv = ["weaktr", *[str(a) for a in args]]
        code = 0
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0
        finally:
            sys.argv = argv
        return Result(code, out.getvalue(), err.getvalue())


def test_provenance_chain(chain: dict[str, Path]) -> None:
    with open_artifact(chain["seeds.h5"], kind="labels") as seeds:
        (parent,) = seeds.meta.parents
        assert Path(parent["path"]) == chain["cams.h5"].resolve()
        assert parent["sha256"] == hashlib.sha256(chain["cams.h5"].read_bytes()).hexdigest()
        assert "crf" in seeds.meta.command and seeds.meta.dataset == "shapes"
    with open_artifact(chain["cams.h5"], kind="cams") as cams:
        assert cams.meta.config["variant"] in ("fine", "cross", "coarse")
        assert cams.meta.parents[0]["path"] == str(chain["cam.ckpt"].resolve())
        assert len(cams) == 24
        for image_id in cams.ids:
            maps = cams.read_cams(image_id).maps
            # each class map min-max normalised: spans [0, 1] unless it is flat (all 0);
            # stored to 1/1024 (docs/artifacts.md), so a peak may read a few steps below 1
            assert (maps.reshape(len(maps), -1).min(axis=1) == 0).all()
            peaks = maps.reshape(len(maps), -1).max(axis=1)
            assert ((peaks == 0) | (np.abs(peaks - 1) <= 4 / 1024)).all(), peaks


def _miou(predictions: dict[str, np.ndarray], dataset) -> float:
    """mIoU (%) computed here, independently of weaktr's metrics: a confusion matrix over the
    pixels with ground truth, a predicted 255 read as background, classes that occur only."""
    n = dataset.num_classes
    matrix = np.zeros((n, n), np.int64)
    for image_id, pred in predictions.items():
        gt = dataset.load_mask(image_id).astype(np.int64)
        pred = np.where(pred == 255, 0, pred).astype(np.int64)
        keep = gt != 255
        matrix += np.bincount(n * gt[keep] + pred[keep], minlength=n * n).reshape(n, n)
    tp = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - tp
    return float(100 * (tp[union > 0] / union[union > 0]).mean())


def test_evaluate_each_artifact(capsys, chain: dict[str, Path], tiny_shapes: Path) -> None:
    from weaktr_cli.data.shapes import open_shapes
    from weaktr_cli.seeds import cams_to_label

    for name in ("cams.h5", "seeds.h5", "preds.h5"):
        result = run_cli(capsys, "evaluate", chain[name], "--data-root", tiny_shapes, "--json")
        assert result.code == 0, result.stderr
        payload = json.loads(result.stdout)
        assert payload["num_images"] == (8 if name == "preds.h5" else 24)
        dataset = open_shapes("val" if name == "preds.h5" else "train", tiny_shapes)
        with open_artifact(chain[name]) as reader:
            if name != "cams.h5":
                labels = {i: reader.read_labels(i) for i in reader.ids}
                assert payload["miou"] == pytest.approx(_miou(labels, dataset), abs=1e-3)
                continue
            records = {i: reader.read_cams(i) for i in reader.ids}
        assert len(payload["sweep"]) == 31
        # every point of the sweep, and the best one, as computed here
        for point in payload["sweep"][::6]:
            labels = {i: cams_to_label(r, point["threshold"]) for i, r in records.items()}
            assert point["miou"] == pytest.approx(_miou(labels, dataset), abs=1e-3), point
        best = max(payload["sweep"], key=lambda p: p["miou"])
        assert payload["best_threshold"] == best["threshold"]
        assert payload["miou"] == pytest.approx(best["miou"], abs=1e-3)
        # The reference's early-stopping search never beats the full sweep.
        reference = payload["reference_search"]
        assert 0.40 <= reference["threshold"] <= 0.60
        assert reference["miou"] <= payload["miou"] + 1e-9


def test_evaluate_checkpoint_equals_predict_then_evaluate(capsys, chain, tiny_shapes,
                                                          tmp_path: Path) -> None:
    direct = run_cli(capsys, "evaluate", "--checkpoint", chain["seg.ckpt"], "--data-root",
                     tiny_shapes, "--split", "val", "--json")
    assert direct.code == 0, direct.stderr
    # the same two steps by hand, with the same (default) settings
    preds = tmp_path / "preds.h5"
    assert run_cli(capsys, "predict", "--checkpoint", chain["seg.ckpt"], "--data-root",
                   tiny_shapes, "--split", "val", "--out", preds, "-q").code == 0
    two_step = run_cli(capsys, "evaluate", preds, "--data-root", tiny_shapes, "--json")
    a, b = json.loads(direct.stdout), json.loads(two_step.stdout)
    assert a["num_images"] == b["num_images"] == 8
    for key in ("miou", "pixel_accuracy", "per_class", "kind", "dataset", "split"):
        assert a[key] == b[key], key


def test_onnx_export_and_predict(capsys, chain: dict[str, Path], tiny_shapes: Path,
                                 tmp_path: Path) -> None:
    onnx_path = tmp_path / "model.onnx"
    result = run_cli(capsys, "export-onnx", "--checkpoint", chain["seg.ckpt"], "--dynamic",
                     "--out", onnx_path, "--json", "--quiet")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["max_abs_diff"] <= 1e-4 and onnx_path.is_file()
    preds = tmp_path / "onnx_preds.h5"
    result = run_cli(capsys, "predict", "--onnx", onnx_path, "--data", "shapes", "--data-root",
                     tiny_shapes, "--split", "val", "--out", preds, "--quiet")
    assert result.code == 0, result.stderr
    with open_artifact(preds) as ours, open_artifact(chain["preds.h5"]) as torch_preds:
        agree = total = 0
        for image_id in torch_preds.ids:
            a, b = ours.read_labels(image_id), torch_preds.read_labels(image_id)
            agree += int((a == b).sum())
            total += a.size
    assert agree / total >= 0.9999
    wrong = run_cli(capsys, "export-onnx", "--checkpoint", chain["cam.ckpt"], "--out",
                    tmp_path / "x.onnx")
    assert wrong.code == 1 and "add --cam" in wrong.stderr


def test_predict_crf_follows_the_recipe_unless_none(capsys, chain, tiny_shapes,
                                                   tmp_path) -> None:
    """The CRF is the recipe's: by default the one the model was trained with (smoke: none),
    voc-test with --recipe shapes, none with --crf none (torch and ONNX alike)."""
    with open_artifact(chain["preds.h5"]) as reader:
        assert reader.meta.config["settings"]["crf"] is None
    onnx_path = tmp_path / "model.onnx"
    assert run_cli(capsys, "export-onnx", "--checkpoint", chain["seg.ckpt"], "--dynamic",
                   "--out", onnx_path, "--quiet").code == 0
    for source in (["--checkpoint", chain["seg.ckpt"]], ["--onnx", onnx_path]):
        for crf, expected in ((None, "voc-test"), ("none", None)):
            out = tmp_path / f"{source[0][2:]}-{crf}.h5"
            result = run_cli(capsys, "predict", *source, "--data", "shapes", "--data-root",
                             tiny_shapes, "--split", "val", "--recipe", "shapes",
                             *(["--crf", crf] if crf else []), "--out", out, "--quiet")
            assert result.code == 0, result.stderr
            with open_artifact(out) as reader:
                assert reader.meta.config["settings"]["crf"] == expected, (source[0], crf)


def test_show_and_inspect(capsys, chain: dict[str, Path], tiny_shapes: Path,
                          tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "panels.png"
    result = run_cli(capsys, "show", chain["cams.h5"], chain["seeds.h5"], "--n", "3",
                     "--data-root", tiny_shapes, "--out", out)
    assert result.code == 0, result.stderr
    with Image.open(out) as image:
        assert image.size[0] >= 160 * 3 and image.size[1] >= 3 * 160
    result = run_cli(capsys, "inspect", chain["seeds.h5"], "--json")
    assert json.loads(result.stdout)["kind"] == "labels"


def test_wrong_kind_and_wrong_checkpoint_fail_clearly(capsys, chain, tiny_shapes) -> None:
    result = run_cli(capsys, "crf", "--cams", chain["seeds.h5"], "--data-root", tiny_shapes)
    assert result.code == 1 and "'labels' artifact" in result.stderr
    result = run_cli(capsys, "dump-cams", "--checkpoint", chain["seg.ckpt"], "--data-root",
                     tiny_shapes)
    assert result.code == 1 and "'segmenter' checkpoint" in result.stderr


def test_retrain_clip_follows_the_recipe_unless_asked(capsys, chain, tiny_shapes,
                                                     tmp_path) -> None:
    """The shapes recipe trains without clipping; --tau (or --clip) switches it on."""
    from weaktr_cli.checkpoints import load_checkpoint

    small = ["--recipe", "shapes", "--arch", "micro", "--crop-size", "32", "--batch-size", "2",
             "--iterations", "1", "--precision", "fp32", "--quiet"]
    for extra, expected in (([], False), (["--tau", "0.5"], True), (["--clip"], True)):
        out = tmp_path / f"seg{len(extra)}{expected}.ckpt"
        result = run_cli(capsys, "retrain", "--seeds", chain["seeds.h5"], "--data-root",
                         tiny_shapes, *small, *extra, "--out", out)
        assert result.code == 0, result.stderr
        _, meta = load_checkpoint(out, kind="segmenter")
        assert meta["train"]["clip"] is expected, extra
    # A threshold without clipping does nothing: refused (issue 14.16), not silently dropped.
    result = run_cli(capsys, "retrain", "--seeds", chain["seeds.h5"], "--data-root",
                     tiny_shapes, *small, "--tau", "0.5", "--no-clip", "--out", tmp_path / "x")
    assert result.code == 1 and "contradict each other" in result.stderr


def test_corrupt_image_gives_one_line(capsys, chain, tiny_shapes, tmp_path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_shapes, broken / "VOC2012")
    victim = sorted((broken / "VOC2012" / "JPEGImages").glob("shapes_train_*"))[0]
    victim.write_bytes(victim.read_bytes()[:40])
    result = run_cli(capsys, "dump-cams", "--checkpoint", chain["cam.ckpt"], "--data-root",
                     broken / "VOC2012", "--out", tmp_path / "c.h5")
    assert result.code == 1 and "cannot read image" in result.stderr
    assert not (tmp_path / "c.h5").exists()
    assert len(result.stderr.strip().splitlines()) <= 2  # the error and its hint


def test_seeded_runs_are_bit_identical(capsys, tiny_shapes: Path, tmp_path: Path,
                                       monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    digests = []
    for run in ("a", "b"):
        ckpt = tmp_path / run / "cam.ckpt"
        ckpt.parent.mkdir()
        assert run_cli(capsys, "train-cam", "--data-root", tiny_shapes, "--recipe", "smoke",
                       "--seed", "7", "--out", ckpt, "-q").code == 0
        monkeypatch.chdir(tmp_path / run)  # same relative command line in both runs
        assert run_cli(capsys, "dump-cams", "--checkpoint", "cam.ckpt", "--data-root",
                       tiny_shapes, "--out", "cams.h5", "-q").code == 0
        digests.append([hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in (ckpt, tmp_path / run / "cams.h5")])
    assert digests[0][0] == digests[1][0], "checkpoints differ"
    with open_artifact(tmp_path / "a" / "cams.h5") as a, \
            open_artifact(tmp_path / "b" / "cams.h5") as b:
        for image_id in a.ids:
            np.testing.assert_array_equal(a.read_cams(image_id).maps, b.read_cams(image_id).maps)


@pytest.mark.slow
def test_pipeline_runs_then_skips(capsys, tiny_shapes: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    args = ["pipeline", "--data-root", tiny_shapes, "--recipe", "smoke", "--work", work,
            "--workers", "1", "--json", "--quiet"]
    first = run_cli(capsys, *args)
    assert first.code == 0, first.stderr
    payload = json.loads(first.stdout)
    assert [p["phase"] for p in payload["phases"]] == [
        "train-cam", "dump-cams", "crf", "retrain", "predict", "evaluate", "report"]
    assert not any(p["skipped"] for p in payload["phases"])
    # CAMs and seeds on train, the model on train and on the held-out test split
    assert set(payload["metrics"]) == {"cams_train", "seeds_train", "model_train", "model_test",
                                       "threshold_seeds_train", "cams_train_threshold"}
    with open_artifact(work / "preds_test.h5") as reader:
        assert reader.meta.split == "test" and len(reader) == 6
    assert not (work / "preds_val.h5").exists()
    for picture in payload["pictures"]:
        assert Path(picture).stat().st_size > 1000
    record = json.loads((work / "metrics.json").read_text())
    assert record["figures"] == payload["metrics"]
    assert record["splits"] == {"train": "train", "val": "val", "test": "test"}
    assert [p["phase"] for p in record["phases"]] == [p["phase"] for p in payload["phases"]]
    assert record["total_wall_s"] == pytest.approx(sum(p["wall_s"] for p in record["phases"]),
                                                   abs=0.1)
    assert record["seeds"] == {"train-cam": 0, "retrain": 0}
    assert record["precision"]["train-cam"] == "fp32"  # the smoke recipe asks for it
    assert isinstance(record["machine"]["native_bf16"], bool) and record["machine"]["cores"] >= 1
    assert record["versions"]["weaktr"] and record["versions"]["torch"]
    # the threshold seeds at the CRF's level come from the CAM sweep at 0.43
    scores = json.loads((work / "scores.json").read_text())
    at_bg = [r["miou"] for r in scores["cams_train"]["sweep"] if r["threshold"] == 0.43]
    assert payload["metrics"]["threshold_seeds_train"] == at_bg[0]
    second = json.loads(run_cli(capsys, *args).stdout)
    assert all(p["skipped"] for p in second["phases"])
    assert second["metrics"] == payload["metrics"]
    # metrics.json stays the record of the run that made the figures (its machine, its times)
    assert json.loads((work / "metrics.json").read_text()) == record
    forced = json.loads(run_cli(capsys, *args, "--force", "crf").stdout)
    skipped = {p["phase"]: p["skipped"] for p in forced["phases"]}
    assert skipped["dump-cams"] and not skipped["crf"] and not skipped["retrain"]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on Linux")
def test_torchrun_two_processes_keep_identical_parameters(tiny_shapes: Path,
                                                          tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(29500 + os.getpid() % 1000),
               str(REPO / "tests" / "ddp_probe.py"), str(tiny_shapes), str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hashes = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert hashes[0][0] == "2"  # optimizer steps taken
    assert hashes[0] == hashes[1]
    assert (tmp_path / "cam.ckpt").is_file()
