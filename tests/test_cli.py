"""The CLI shell: exit codes, the error boundary, stdout/stderr discipline, completions,
help text and evaluate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.cli_helpers import run_cli
from weaktr_cli import __version__
from weaktr_cli.artifacts import ArtifactWriter, new_meta
from weaktr_cli.data.images import write_label_png, write_rgb
from weaktr_cli.data.voc import VOC_CLASSES, VocDataset

REPO = Path(__file__).resolve().parents[1]


def test_version_and_help(capsys) -> None:
    result = run_cli(capsys, "--version")
    assert result.code == 0 and result.stdout.strip() == f"weaktr {__version__}"
    result = run_cli(capsys, "--help")
    assert result.code == 0 and "evaluate" in result.stdout


def test_usage_error_exits_2(capsys) -> None:
    result = run_cli(capsys, "evaluate", "x.h5", "--data", "bogus")
    assert result.code == 2 and "bogus" in result.stderr and result.stdout == ""


def test_user_error_is_one_red_line_without_traceback(capsys, tmp_path: Path) -> None:
    result = run_cli(capsys, "inspect", tmp_path / "missing.h5")
    assert result.code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: artifact") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_debug_env_shows_traceback(tmp_path: Path) -> None:
    env = {"WEAKTR_DEBUG": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "weaktr_cli", "inspect", str(tmp_path / "missing.h5")],
        capture_output=True, text=True, env=env, cwd=REPO, check=False,
    )
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "WeakTrError" in proc.stderr


def test_completions_match_the_cli() -> None:
    from weaktr_cli.completion import generate_all

    for name, text in generate_all().items():
        path = REPO / "completions" / name
        assert path.read_text() == text, (
            f"{path} is stale: run `python -m weaktr_cli.completion completions`"
        )


def test_bash_completion_completes_commands_and_choices() -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash not installed")
    script = REPO / "completions" / "weaktr.bash"
    probe = (
        f"source {script}; "
        "COMP_WORDS=(weaktr ev); COMP_CWORD=1; _weaktr; echo \"${COMPREPLY[@]}\"; "
        "COMP_WORDS=(weaktr evaluate a.h5 --data ''); COMP_CWORD=4; _weaktr; "
        "echo \"${COMPREPLY[@]}\"; "
        "COMP_WORDS=(weaktr data c); COMP_CWORD=2; _weaktr; echo \"${COMPREPLY[@]}\""
    )
    lines = subprocess.run(["bash", "-c", probe], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert lines == ["evaluate", "shapes voc coco", "check"]


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_other_completions_parse(shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} not installed")
    name = {"zsh": "_weaktr", "fish": "weaktr.fish"}[shell]
    subprocess.run([shell, "-n", str(REPO / "completions" / name)], check=True)


# ----------------------------------------------------------------------------- evaluate


def _gt_artifact(path: Path, dataset: VocDataset, ids: list[str], edit=None) -> Path:
    meta = new_meta("labels", "voc", dataset.split, dataset.class_names)
    with ArtifactWriter(path, meta) as writer:
        for image_id in ids:
            label = dataset.load_mask(image_id).copy()
            if edit is not None:
                edit(image_id, label)
            writer.write_labels(image_id, label)
        writer.finalize()
    return path


def test_evaluate_ground_truth_against_itself_is_100(capsys, tmp_path, voc_sample) -> None:
    dataset = VocDataset(voc_sample, "trainval")
    artifact = _gt_artifact(tmp_path / "gt.h5", dataset, dataset.ids)
    result = run_cli(capsys, "evaluate", artifact, "--data-root", voc_sample, "--json",
                     "--out", tmp_path / "m.json")
    assert result.code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["miou"] == 100.0 and payload["pixel_accuracy"] == 100.0
    assert payload["num_images"] == 6
    assert json.loads((tmp_path / "m.json").read_text())["miou"] == 100.0
    table = run_cli(capsys, "evaluate", artifact, "--data-root", voc_sample)
    assert "mIoU" in table.stdout and "100.0" in table.stdout


def test_evaluate_hand_made_perturbation(capsys, tmp_path, voc_sample) -> None:
    """2007_000033 has background and aeroplane; paint a 10x10 background block as aeroplane."""
    dataset = VocDataset(voc_sample, "trainval")
    gt = dataset.load_mask("2007_000033")
    assert gt[:10, :10].max() == 0  # the block is background in ground truth
    n_bg, n_plane = int((gt == 0).sum()), int((gt == 1).sum())

    def paint(image_id: str, label: np.ndarray) -> None:
        label[:10, :10] = 1

    artifact = _gt_artifact(tmp_path / "p.h5", dataset, ["2007_000033"], paint)
    result = run_cli(capsys, "evaluate", artifact, "--data-root", voc_sample, "--json")
    payload = json.loads(result.stdout)
    iou_bg = (n_bg - 100) / n_bg  # TP n_bg-100, FN 100, FP 0
    iou_plane = n_plane / (n_plane + 100)  # TP n_plane, FP 100, FN 0
    assert payload["miou"] == pytest.approx((iou_bg + iou_plane) / 2 * 100, abs=1e-4)
    rows = {row["name"]: row for row in payload["per_class"]}
    assert rows["aeroplane"]["precision"] == pytest.approx(n_plane / (n_plane + 100) * 100,
                                                          abs=1e-4)
    assert rows["aeroplane"]["recall"] == 100.0
    assert rows["cat"]["iou"] is None  # absent classes are left out, not zero


def _tiny_voc(root: Path, corrupt: str | None = None) -> Path:
    """A 2-image VOC layout made from scratch (never a copy of the shared samples)."""
    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id in ("a", "b"):
        write_rgb(root / "JPEGImages" / f"{image_id}.jpg", rng.integers(0, 255, (8, 8, 3),
                                                                       dtype=np.uint8))
        mask = np.zeros((8, 8), np.uint8)
        mask[2:5, 2:5] = 12
        write_label_png(root / "SegmentationClass" / f"{image_id}.png", mask)
    (root / "ImageSets/Segmentation/train.txt").write_text("a\nb\n")
    if corrupt:
        (root / corrupt).write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


def _labels_artifact(path: Path, ids, names=VOC_CLASSES, shape=(8, 8), split="train") -> Path:
    with ArtifactWriter(path, new_meta("labels", "voc", split, names)) as writer:
        for image_id in ids:
            writer.write_labels(image_id, np.zeros(shape, np.uint8))
        writer.finalize()
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing root", "does not exist"),
        ("no root", "needs a data root"),
        ("wrong layout", "no JPEGImages folder"),
        ("unknown id", "not in voc/train"),
        ("class count", "has 4 classes, dataset 'voc' has 21"),
        ("truncated", "truncated or corrupt"),
        ("newer schema", "newer than this weaktr reads"),
        ("corrupt mask", "SegmentationClass"),
        ("wrong size", "prediction is (3, 3) but ground truth is (8, 8)"),
    ],
)
def test_evaluate_bad_inputs(capsys, tmp_path: Path, case: str, message: str) -> None:
    root = _tiny_voc(tmp_path / "voc", corrupt="SegmentationClass/b.png"
                     if case == "corrupt mask" else None)
    artifact = tmp_path / "a.h5"
    args = ["--data", "voc", "--data-root", root]
    if case == "missing root":
        args[-1] = tmp_path / "nowhere"
    elif case == "no root":
        args = ["--data", "voc"]
    elif case == "wrong layout":
        args[-1] = tmp_path
    ids = ["a", "zzz"] if case == "unknown id" else ["a", "b"]
    names = VOC_CLASSES[:4] if case == "class count" else VOC_CLASSES
    _labels_artifact(artifact, ids, names, shape=(3, 3) if case == "wrong size" else (8, 8))
    if case == "truncated":
        artifact.write_bytes(artifact.read_bytes()[:300])
    if case == "newer schema":
        with h5py.File(artifact, "a") as f:
            f.attrs["schema_version"] = 99
    result = run_cli(capsys, "evaluate", artifact, *args)
    assert result.code == 1, result
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_data_check_names_missing_pieces(capsys, tmp_path: Path) -> None:
    root = _tiny_voc(tmp_path / "voc")
    (root / "JPEGImages" / "b.jpg").unlink()
    result = run_cli(capsys, "data", "check", "--data", "voc", "--data-root", root, "--json")
    assert result.code == 1
    payload = json.loads(result.stdout)
    assert payload["ok"] is False and any("no image" in p for p in payload["problems"])


def test_inspect_reports_provenance(capsys, tmp_path: Path) -> None:
    artifact = _labels_artifact(tmp_path / "a.h5", ["a", "b"])
    result = run_cli(capsys, "inspect", artifact, "--json")
    payload = json.loads(result.stdout)
    assert payload["kind"] == "labels" and payload["images"] == 2
    assert payload["class_names"][12] == "dog" and payload["schema_version"] == 2
    assert run_cli(capsys, "inspect", artifact).code == 0


def test_merge_command_prints_path_only(capsys, tmp_path: Path) -> None:
    a = _labels_artifact(tmp_path / "a.h5", ["a"])
    b = _labels_artifact(tmp_path / "b.h5", ["b"])
    result = run_cli(capsys, "merge", a, b, "--out", tmp_path / "ab.h5", "--quiet")
    assert result.code == 0 and result.stdout == f"{tmp_path / 'ab.h5'}\n"


def test_cli_import_stays_light() -> None:
    """`weaktr --help` and completion must not pay for torch, timm or h5py."""
    code = ("import sys, weaktr_cli.commands.app; "
            "print(sorted(m for m in ('torch', 'timm', 'h5py', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.strip()
    assert out == "[]"


def test_help_shows_every_option_text(capsys, monkeypatch) -> None:
    # Rich markup eats anything in square brackets ("[default: x]" vanished from --help once),
    # so every option's help must come out of the renderer word for word.
    import click
    import typer

    from weaktr_cli.commands.app import app

    monkeypatch.setenv("COLUMNS", "400")
    root = typer.main.get_command(app)

    def walk(command: click.Command, path: tuple[str, ...]):
        yield path, command
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, (*path, name))

    for path, command in walk(root, ()):
        rendered = " ".join(run_cli(capsys, *path, "--help").stdout.split())
        for param in command.params:
            text = " ".join((getattr(param, "help", None) or "").split())
            assert text in rendered, f"weaktr {' '.join(path)} --help lost: {text!r}"
