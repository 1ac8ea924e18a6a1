"""Off the VOC / COCO / shapes track: a dataset of one's own without masks, folders of photos,
checkpoints and ONNX files in `inspect`, panels, `data check`. Every test runs the user's
command through the real entry point (issue 18)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.cli_helpers import run_cli
from tests.test_end_to_end import _Capture

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("background", "cat", "dog")
COLOURS = {"cat": (220, 40, 40), "dog": (40, 60, 220)}


def make_own_dataset(folder: Path, n: int, *, val: int = 2, size: int = 32,
                     name: str = "mydata", masks: bool = False) -> Path:
    """The README's "Bring your own dataset" layout, without masks unless `masks`: n JPEG
    photos with a red (cat) and/or blue (dog) square on a grey textured background,
    train = all, val = the first `val`; labels by class name in cls_labels.json."""
    rng = np.random.default_rng(0)
    (folder / "JPEGImages").mkdir(parents=True)
    (folder / "ImageSets" / "Segmentation").mkdir(parents=True)
    if masks:
        (folder / "SegmentationClass").mkdir()
    labels: dict[str, list[str]] = {}
    ids = [f"photo_{i:03d}" for i in range(n)]
    for k, image_id in enumerate(ids):
        pixels = rng.normal(128, 20, size=(size, size, 3))
        present = [["cat"], ["dog"], ["cat", "dog"]][k % 3]
        label = np.zeros((size, size), np.uint8)
        for j, cls in enumerate(present):
            x = 2 + j * size // 2
            pixels[6:6 + size // 3, x:x + size // 3] = COLOURS[cls]
            label[6:6 + size // 3, x:x + size // 3] = CLASSES.index(cls)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            folder / "JPEGImages" / f"{image_id}.jpg", quality=95)
        if masks:
            from weaktr_cli.data.images import write_label_png

            write_label_png(folder / "SegmentationClass" / f"{image_id}.png", label)
        labels[image_id] = present
    (folder / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    (folder / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids[:val]) + "\n")
    (folder / "cls_labels.json").write_text(json.dumps(
        {"classes": list(CLASSES[1:]), "labels": labels}))
    (folder / "weaktr_dataset.json").write_text(json.dumps(
        {"name": name, "class_names": list(CLASSES)}))
    return folder


@pytest.fixture(scope="module")
def own_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`weaktr pipeline` on a dataset of one's own without masks (smoke recipe, 8 photos).

    Its exit code is checked by the first test only: the other tests use what the phases
    wrote, which a pipeline that failed at its evaluation (issue 18) wrote too."""
    base = tmp_path_factory.mktemp("own")
    data = make_own_dataset(base / "mydata", 8)
    work = base / "run"
    result = _Capture().run("pipeline", "--data", "voc", "--data-root", data, "--recipe",
                            "smoke", "--work", work, "--workers", "1", "--json")
    return {"data": data, "work": work, "code": result.code, "stdout": result.stdout,
            "stderr": result.stderr}


# ----------------------------------------------------------------------------- item 1


def test_pipeline_without_masks_runs_to_the_end(own_run: dict[str, Any]) -> None:
    assert own_run["code"] == 0, own_run["stderr"]
    payload = json.loads(own_run["stdout"])
    work = own_run["work"]
    assert [p["phase"] for p in payload["phases"]][-2:] == ["evaluate", "report"]
    assert payload["unscored"] == ["mydata/train", "mydata/val"]
    assert all(v is None for v in payload["metrics"].values())
    assert "no pixel labels in mydata/train and mydata/val" in own_run["stderr"]
    assert payload["pictures"] == [str(work / "panels.png")]
    with Image.open(work / "panels.png") as panels:
        assert panels.size[1] > 4 * 224  # 8 rows of image | CAMs | seeds | prediction
    scores = json.loads((work / "scores.json").read_text())
    assert scores["model_val"] == {"miou": None, "unscored": "no pixel labels in mydata/val"}
    assert json.loads((work / "metrics.json").read_text())["figures"]["model_val"] is None


def test_pipeline_without_masks_says_so_in_its_table(capsys, own_run: dict[str, Any]) -> None:
    result = run_cli(capsys, "pipeline", "--data", "voc", "--data-root", own_run["data"],
                     "--recipe", "smoke", "--work", own_run["work"], "--workers", "1")
    assert result.code == 0, result.stderr
    assert "not scored: no pixel labels in mydata/train and mydata/val" in result.stdout
    assert "cached" in result.stdout


def test_data_check_treats_masks_as_optional(capsys, tmp_path: Path, monkeypatch) -> None:
    data = make_own_dataset(tmp_path / "mydata", 4)
    monkeypatch.setenv("WEAKTR_DATA_ROOT", str(data))
    result = run_cli(capsys, "data", "check", "--data", "voc", "--json")
    assert result.code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["ok"] is True and payload["problems"] == []
    assert payload["data_root"] == str(data.resolve())  # from the environment, not null
    assert payload["splits"]["train"] == {
        "images": 4, "masks": 0, "labels": {"cls_labels": 4, "masks": 0, "xml": 0}}
    assert payload["splits"]["val"]["images"] == 2
    assert any("train.txt: no pixel masks (optional" in n for n in payload["notes"])
    text = run_cli(capsys, "data", "check", "--data", "voc")
    assert text.code == 0
    assert "train: 4 images, 0 masks; image-level labels: 4 from cls_labels" in text.stdout


# ----------------------------------------------------------------------------- items 5, 6


def test_show_draws_a_folder_prediction(capsys, own_run, tmp_path: Path, monkeypatch) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for source in sorted((own_run["data"] / "JPEGImages").iterdir())[:3]:
        (photos / source.name).write_bytes(source.read_bytes())
    preds = tmp_path / "photos.h5"
    result = run_cli(capsys, "predict", "--checkpoint", own_run["work"] / "seg.ckpt",
                     "--images", photos, "--out", preds, "--quiet")
    assert result.code == 0, result.stderr
    # A data root meant for VOC must not get in the way of a folder prediction.
    monkeypatch.setenv("WEAKTR_DATA_ROOT", str(own_run["data"]))
    result = run_cli(capsys, "show", preds, "--out", tmp_path / "p.png", "--quiet")
    assert result.code == 0, result.stderr
    with Image.open(tmp_path / "p.png") as image:
        assert image.size[1] >= 3 * 224


def test_custom_artifacts_find_their_data(capsys, own_run, tmp_path: Path) -> None:
    """show and crf on a custom dataset's artifact need no --data-root: the artifact records
    where its images live; when that folder is gone the hint names --data-root."""
    cams = own_run["work"] / "cams_train.h5"
    inspected = json.loads(run_cli(capsys, "inspect", cams, "--json").stdout)
    assert inspected["data_root"] == str(own_run["data"].resolve())
    result = run_cli(capsys, "show", cams, "--n", "2", "--out", tmp_path / "c.png", "--quiet")
    assert result.code == 0, result.stderr
    result = run_cli(capsys, "crf", "--cams", cams, "--out", tmp_path / "s.h5", "--quiet")
    assert result.code == 0, result.stderr
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(own_run["data"], moved)
    shutil.copy(cams, tmp_path / "cams.h5")
    import h5py

    with h5py.File(tmp_path / "cams.h5", "a") as f:
        f.attrs["data_root"] = str(tmp_path / "gone")
    result = run_cli(capsys, "show", tmp_path / "cams.h5", "--out", tmp_path / "x.png")
    assert result.code == 1 and "unknown dataset 'mydata'" in result.stderr
    assert "pass --data-root" in result.stderr and "choose one of" not in result.stderr
    result = run_cli(capsys, "show", tmp_path / "cams.h5", "--data-root", moved,
                     "--out", tmp_path / "x.png", "--quiet")
    assert result.code == 0, result.stderr


# ----------------------------------------------------------------------------- item 7, 12


def test_inspect_describes_checkpoints_and_onnx(capsys, own_run, tmp_path: Path) -> None:
    work = own_run["work"]
    cam = json.loads(run_cli(capsys, "inspect", work / "cam.ckpt", "--json").stdout)
    assert cam["format"] == "checkpoint" and cam["kind"] == "cam" and cam["arch"] == "micro"
    assert cam["class_names"] == list(CLASSES) and cam["dataset"] == "mydata"
    assert cam["parameters"] > 10_000 and cam["train"]["batch_size"] == 8
    assert cam["pretrained"] is None and cam["seed"] == 0
    assert set(cam["companions"]) >= {".last", ".state"}
    seg = json.loads(run_cli(capsys, "inspect", work / "seg.ckpt", "--json").stdout)
    assert seg["kind"] == "segmenter" and seg["result"]["steps"] == 4
    assert str(seg["pretrained"]).endswith("cam.ckpt")  # the smoke recipe starts from it
    text = run_cli(capsys, "inspect", work / "seg.ckpt")
    assert text.code == 0 and "segmentation model (retrain) checkpoint" in text.stdout
    assert "--resume" in text.stdout
    text = run_cli(capsys, "inspect", work / "cam.ckpt")
    assert "none: trained from scratch" in text.stdout
    state = run_cli(capsys, "inspect", work / "seg.ckpt.state", "--json")
    assert state.code == 0 and "optimizer" in json.loads(state.stdout)["keys"]
    onnx = tmp_path / "model.onnx"
    assert run_cli(capsys, "export-onnx", "--checkpoint", work / "seg.ckpt", "--out", onnx,
                   "--quiet").code == 0
    model = json.loads(run_cli(capsys, "inspect", onnx, "--json").stdout)
    assert model["format"] == "onnx" and model["kind"] == "segmenter"
    assert model["class_names"] == list(CLASSES) and model["dataset"] == "mydata"
    garbage = tmp_path / "notes.txt"
    garbage.write_text("hello")
    bad = run_cli(capsys, "inspect", garbage)
    assert bad.code == 1 and "not a weaktr artifact, checkpoint or ONNX model" in bad.stderr


def test_inspect_says_no_seed_instead_of_none(capsys, tmp_path: Path) -> None:
    from weaktr_cli.artifacts import ArtifactWriter, new_meta

    meta = new_meta("labels", "voc", "val", ("background", "cat"))
    with ArtifactWriter(tmp_path / "a.h5", meta) as writer:
        writer.write_labels("x", np.zeros((4, 4), np.uint8))
        writer.finalize()
    result = run_cli(capsys, "inspect", tmp_path / "a.h5")
    assert result.code == 0
    assert "seed None" not in result.stdout and "no seed recorded" in result.stdout


# ----------------------------------------------------------------------------- item 10


def test_panels_cut_ids_with_an_ellipsis_and_legend_only_shown_classes(
        capsys, tmp_path: Path) -> None:
    from weaktr_cli.artifacts import ArtifactWriter, new_meta
    from weaktr_cli.data.voc import write_dataset_info
    from weaktr_cli.visualize import TILE, shorten

    long_id = "COCO_train2014_000000040083_with_a_long_tail"
    cut = shorten(long_id, 120)
    assert cut.endswith("\u2026") and long_id.startswith(cut[:-1])
    assert shorten("short", 120) == "short"

    root = tmp_path / "wide"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    Image.fromarray(np.full((50, 100, 3), 90, np.uint8)).save(
        root / "JPEGImages" / f"{long_id}.jpg")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text(long_id + "\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text(long_id + "\n")
    names = ["background", *[f"class{i:02d}" for i in range(1, 81)]]
    write_dataset_info(root, "many", names)
    label = np.zeros((50, 100), np.uint8)
    label[10:20, 10:20] = 7
    meta = new_meta("labels", "many", "train", names, data_root=root)
    with ArtifactWriter(tmp_path / "l.h5", meta) as writer:
        writer.write_labels(long_id, label)
        writer.finalize()
    out = tmp_path / "p.png"
    result = run_cli(capsys, "show", tmp_path / "l.h5", "--out", out, "--quiet")
    assert result.code == 0, result.stderr
    with Image.open(out) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    # two tiles of a 2:1 image at TILE high, side by side without gaps beyond 4 px
    assert width == 2 * 2 * TILE + 4
    # the legend: one line (background, class07), not 80 classes
    assert height < TILE + 16 + 4 + 2 * 18 + 4
    legend = pixels[TILE + 20:]
    from weaktr_cli.data.images import voc_palette

    palette = voc_palette()
    for class_id, expected in ((7, True), (8, False), (80, False)):
        colour = np.array(palette[3 * class_id: 3 * class_id + 3], np.uint8)
        found = bool((legend == colour).all(axis=2).any())
        assert found is expected, class_id


# ----------------------------------------------------------------------------- item 12


def test_top_level_help_names_every_phase(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    result = run_cli(capsys, "--help")
    assert "train-cam -> dump-cams -> crf -> retrain -> predict -> evaluate" in result.stdout


# ----------------------------------------------------------------------------- item 11

COMPLETIONS = REPO / "completions"


def _shell(name: str) -> str:
    import shutil

    if shutil.which(name) is None:
        pytest.skip(f"{name} not installed")
    return name


def _run(argv: list[str], cwd: Path) -> list[str]:
    import subprocess

    return subprocess.run(argv, capture_output=True, text=True, check=True,
                          cwd=cwd).stdout.splitlines()


def _answers(lines: list[str]) -> list[str]:
    """The output after each '#' marker line, one string per marker."""
    answers: list[list[str]] = []
    for line in lines:
        if line == "#":
            answers.append([])
        elif answers:
            answers[-1].append(line)
    return ["\n".join(a) for a in answers]


@pytest.fixture
def files_here(tmp_path: Path) -> Path:
    for name in ("cam.ckpt", "cams.h5"):
        (tmp_path / name).write_text("")
    return tmp_path


def test_bash_completes_option_values(files_here: Path) -> None:
    probe = f"source {COMPLETIONS / 'weaktr.bash'}; " + "; ".join(
        f"COMP_WORDS=({words}); COMP_CWORD={len(words.split()) - 1}; _weaktr; "
        'echo "${COMPREPLY[*]}"'
        for words in ("weaktr dump-cams --checkpoint ''", "weaktr predict -o c",
                      "weaktr train-cam --arch tiny", "weaktr pipeline --recipe ''",
                      "weaktr predict --crf ''", "weaktr dump-cams --precision ''",
                      "weaktr pipeline --force ''", "weaktr export-onnx --variant ''",
                      "weaktr pipeline --seed ''"))
    lines = _run([_shell("bash"), "-c", probe], files_here)
    assert sorted(lines[0].split()) == ["cam.ckpt", "cams.h5"]  # files, not option names
    assert sorted(lines[1].split()) == ["cam.ckpt", "cams.h5"]
    assert lines[2].split()[:2] == ["tiny-p8", "tiny-c8"]
    assert {"shapes", "voc", "coco"} <= set(lines[3].split())
    assert {"voc", "coco", "voc-test"} <= set(lines[4].split()) and lines[4].endswith("none")
    assert lines[5].split()[:4] == ["auto", "fp32", "bf16", "fp16"]
    assert lines[6].split()[:2] == ["train-cam", "dump-cams"]
    assert lines[7].split() == ["fine", "cross", "coarse"]
    assert lines[8] == ""  # a number: no option names


def test_zsh_completes_option_values(files_here: Path) -> None:
    stubs = ('compadd() { print -r -- "compadd $*" }; _files() { print -r -- _files }; '
             '_message() { print -r -- "_message $*" }; _describe() { : }')
    calls = "; ".join(f"print -- '#'; words=({words}); CURRENT={len(words.split())}; _weaktr"
                      for words in ("weaktr dump-cams --checkpoint ''",
                                    "weaktr train-cam --arch ''", "weaktr predict --crf ''",
                                    "weaktr pipeline --seed ''"))
    out = _run([_shell("zsh"), "-c", f"{stubs}; source {COMPLETIONS / '_weaktr'}; {calls}"],
               files_here)
    answers = _answers(out)
    assert answers[0].strip() == "_files"
    assert answers[1].startswith("compadd -- deit-small vit-small") and "tiny-p8" in answers[1]
    assert answers[2].startswith("compadd -- voc coco") and answers[2].endswith("none")
    assert answers[3].strip() == "_message value"


def test_fish_completes_option_values(files_here: Path) -> None:
    script = COMPLETIONS / "weaktr.fish"
    calls = "; ".join(f"echo '#'; complete -C'{line}'" for line in (
        "weaktr dump-cams --checkpoint ", "weaktr train-cam --arch ",
        "weaktr pipeline --force ", "weaktr pipeline --seed "))
    out = _run([_shell("fish"), "-c", f"source {script}; {calls}"], files_here)
    answers = [a.split() for a in _answers(out)]
    assert sorted(answers[0]) == ["cam.ckpt", "cams.h5"]
    assert "tiny-p8" in answers[1] and "deit-small" in answers[1]
    assert "retrain" in answers[2] and "--force" not in answers[2]
    assert answers[3] == []


def _weaktr(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The console entry point in a fresh process: stderr is a pipe, as under cron or CI, and
    library loggers print through Python's default handler (pytest captures them in-process)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "weaktr_cli", *[str(a) for a in args]],
                          capture_output=True, text=True, env=env, cwd=cwd, check=False)


def test_quiet_is_quiet_and_logs_are_not_wrapped_off_a_terminal(tmp_path: Path) -> None:
    """8 photos in one batch of 8 make a one-step cosine schedule, which timm warns about."""
    data = make_own_dataset(tmp_path / "mydata", 8)
    common = ["train-cam", "--data", "voc", "--data-root", data, "--recipe", "shapes",
              "--arch", "tiny-p8", "--epochs", "1", "--batch-size", "8", "--input-size", "32",
              "--precision", "fp32"]
    quiet = _weaktr(*common, "--out", tmp_path / "cam.ckpt", "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    loud = _weaktr(*common, "--out", tmp_path / "cam2.ckpt")
    assert loud.returncode == 0, loud.stderr
    (training,) = [line for line in loud.stderr.splitlines() if line.startswith("training ")]
    assert len(training) > 80 and training.endswith("world 1"), loud.stderr  # one line


# ----------------------------------------------------------------------------- item 3


def _photos(own_run: dict[str, Any], folder: Path, count: int) -> Path:
    folder.mkdir()
    for source in sorted((own_run["data"] / "JPEGImages").iterdir())[:count]:
        (folder / source.name).write_bytes(source.read_bytes())
    return folder


def _export(capsys, checkpoint: Path, onnx: Path) -> Path:
    assert run_cli(capsys, "export-onnx", "--checkpoint", checkpoint, "--dynamic", "--out",
                   onnx, "--quiet").code == 0
    return onnx


@pytest.fixture(scope="module")
def own_onnx(own_run: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`weaktr export-onnx --dynamic` of the pipeline's seg.ckpt."""
    onnx = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = _Capture().run("export-onnx", "--checkpoint", own_run["work"] / "seg.ckpt",
                            "--dynamic", "--out", onnx, "--quiet")
    assert result.code == 0, result.stderr
    return onnx


def _predict_both(capsys, checkpoint: Path, onnx: Path, photos: Path,
                  out: Path) -> dict[str, Path]:
    """`weaktr predict --checkpoint` and `--onnx` on `photos` with no other flag."""
    made = {}
    for source in (["--checkpoint", checkpoint], ["--onnx", onnx]):
        path = out / f"{onnx.stem}-{source[0][2:]}.h5"
        result = run_cli(capsys, "predict", *source, "--images", photos, "--out", path, "-q")
        assert result.code == 0, result.stderr
        made[source[0]] = path
    return made


def _same_masks(made: dict[str, Path]) -> tuple[dict[str, Any], float]:
    """(the torch run's settings, the share of pixels where both runs agree), after checking
    that both ran the same test time."""
    from weaktr_cli.artifacts import open_artifact

    with open_artifact(made["--checkpoint"]) as torch_preds, \
            open_artifact(made["--onnx"]) as onnx_preds:
        settings = torch_preds.meta.config["settings"]
        onnx_settings = onnx_preds.meta.config["settings"]
        for key, value in onnx_settings.items():  # the ONNX settings are a subset
            assert settings[key] == value, key
        agree = total = 0
        for image_id in torch_preds.ids:
            a, b = torch_preds.read_labels(image_id), onnx_preds.read_labels(image_id)
            agree += int((a == b).sum())
            total += a.size
    return settings, agree / total


@pytest.mark.usefixtures("one_torch_thread")  # tiny models
def test_torch_and_onnx_predict_the_same_masks_by_default(capsys, own_run, own_onnx,
                                                          tmp_path) -> None:
    """Both follow the recipe the model was trained with (here the tests' smoke recipe)."""
    photos = _photos(own_run, tmp_path / "photos", 4)
    settings, agreement = _same_masks(_predict_both(capsys, own_run["work"] / "seg.ckpt",
                                                    own_onnx, photos, tmp_path))
    assert (settings["flip"], settings["crf"]) == (False, None)  # smoke's, not voc's
    assert agreement >= 0.999
    refused = run_cli(capsys, "predict", "--onnx", own_onnx, "--images", photos, "--precision",
                      "bf16", "--out", tmp_path / "bf16.h5")
    assert refused.code == 1 and "--precision applies to PyTorch models" in refused.stderr


@pytest.mark.usefixtures("one_torch_thread")  # tiny models
def test_the_training_recipe_goes_from_checkpoint_to_onnx_to_predict(capsys, own_run, own_onnx,
                                                                     tmp_path) -> None:
    """The recipe is recorded by retraining, copied by export-onnx, shown by inspect and
    chosen by both predictors; a checkpoint without one (older weaktr) keeps working."""
    from weaktr_cli.checkpoints import load_checkpoint, read_checkpoint_meta, save_checkpoint
    from weaktr_cli.onnx_infer import read_onnx_info

    work = own_run["work"]
    assert read_checkpoint_meta(work / "seg.ckpt")["recipe"] == "smoke"
    assert read_onnx_info(own_onnx).recipe == "smoke"
    for path in (work / "seg.ckpt", own_onnx):
        assert json.loads(run_cli(capsys, "inspect", path, "--json").stdout)["recipe"] == "smoke"
        text = run_cli(capsys, "inspect", path).stdout
        assert "mydata" in text and "with the smoke recipe" in text
    # A checkpoint of weaktr before the recipe was recorded: both fall back to the recipe of
    # its dataset (VOC's for a dataset of one's own), the ONNX file records none.
    tensors, meta = load_checkpoint(work / "seg.ckpt")
    old = save_checkpoint(tmp_path / "old.ckpt", tensors,
                          {k: v for k, v in meta.items() if k != "recipe"})
    old_onnx = _export(capsys, old, tmp_path / "old.onnx")
    assert read_onnx_info(old_onnx).recipe is None
    photos = _photos(own_run, tmp_path / "photos", 2)
    settings, agreement = _same_masks(_predict_both(capsys, old, old_onnx, photos, tmp_path))
    assert settings["procedure"] == "reference" and settings["crf"] == "voc-test"
    assert agreement >= 0.999
    # A recipe this weaktr does not know (a project's own, registered elsewhere): said so.
    unknown = save_checkpoint(tmp_path / "unknown.ckpt", tensors, {**meta, "recipe": "mine"})
    result = run_cli(capsys, "predict", "--checkpoint", unknown, "--images", photos, "--out",
                     tmp_path / "unknown.h5")
    assert result.code == 0, result.stderr
    assert "trained with recipe 'mine', which this weaktr does not know: predicting with " \
           "the voc recipe's test time" in " ".join(result.stderr.split())


@pytest.mark.usefixtures("one_torch_thread")  # tiny models
def test_reference_test_time_is_the_same_through_onnx(capsys, own_run, tmp_path) -> None:
    """A model retrained with the voc recipe: both predictors run the reference's test time
    (base size 520, 0.8 P1 + P2 from an export that holds both layers, the voc-test CRF)."""
    from weaktr_cli.onnx_infer import read_onnx_info

    checkpoint = tmp_path / "voc.ckpt"
    result = run_cli(capsys, "retrain", "--seeds", own_run["work"] / "seeds_train.h5",
                     "--recipe", "voc", "--from-scratch", "--arch", "micro", "--crop-size",
                     "32", "--iterations", "2", "--out", checkpoint, "-q")
    assert result.code == 0, result.stderr
    onnx = _export(capsys, checkpoint, tmp_path / "voc.onnx")
    info = read_onnx_info(onnx)
    assert (info.recipe, info.layers) == ("voc", 2)  # every layer: the recipe fuses them
    photos = _photos(own_run, tmp_path / "photos", 4)
    settings, agreement = _same_masks(_predict_both(capsys, checkpoint, onnx, photos,
                                                    tmp_path))
    assert (settings["procedure"], settings["base_size"], settings["crf"]) == (
        "reference", 520, "voc-test")
    assert settings["layer_weights"] == [0.8, 1.0] and settings["flip"] is False
    assert agreement >= 0.999


# ----------------------------------------------------------------------------- item 12


def test_training_help_names_the_files_kept_for_resume(capsys, monkeypatch) -> None:
    """`.last` and `.state` (87 + 174 MB for DeiT-S) are named, with when to delete them."""
    monkeypatch.setenv("COLUMNS", "200")
    for command in ("train-cam", "retrain"):
        text = " ".join(run_cli(capsys, command, "--help").stdout.split())
        assert "OUT.last" in text and "OUT.state" in text, command
        assert "Delete .last and .state" in text, command


def test_predict_counts_pngs_in_english(capsys, own_run, tmp_path: Path) -> None:
    photos = _photos(own_run, tmp_path / "one", 1)
    result = run_cli(capsys, "predict", "--checkpoint", own_run["work"] / "seg.ckpt",
                     "--images", photos, "--out", tmp_path / "p.h5", "--png-dir",
                     tmp_path / "masks")
    assert result.code == 0, result.stderr
    assert f"wrote 1 PNG to {tmp_path / 'masks'}" in result.stderr
    assert "PNGs" not in result.stderr


def test_evaluate_checkpoint_reports_no_deleted_artifact(capsys, own_run, tmp_path) -> None:
    masked = make_own_dataset(tmp_path / "masked", 4, masks=True)
    result = run_cli(capsys, "evaluate", "--checkpoint", own_run["work"] / "seg.ckpt",
                     "--data", "voc", "--data-root", masked, "--split", "val", "--json")
    assert result.code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["artifact"] is None  # the predictions lived in a temporary folder
    assert payload["checkpoint"] == str(own_run["work"] / "seg.ckpt")
    assert payload["num_images"] == 2
    kept = tmp_path / "kept.h5"
    result = run_cli(capsys, "evaluate", "--checkpoint", own_run["work"] / "seg.ckpt",
                     "--data", "voc", "--data-root", masked, "--split", "val",
                     "--predictions", kept, "--json")
    assert json.loads(result.stdout)["artifact"] == str(kept) and kept.is_file()
    text = run_cli(capsys, "evaluate", "--checkpoint", own_run["work"] / "seg.ckpt",
                   "--data", "voc", "--data-root", masked, "--split", "val")
    assert "seg.ckpt" in text.stdout and "preds.h5" not in text.stdout


# ----------------------------------------------------------------------------- items 2, 4

#: What makes the README's command fit a test: DeiT-Tiny at 32 px, one epoch, two steps (its
#: 36 attention maps suit the paper's AAF, which micro's 4 are too few for).
TINY = ["--cam-arch", "deit-tiny", "--cam-input-size", "32", "--cam-epochs", "1",
        "--seg-arch", "deit-tiny", "--seg-crop-size", "32", "--seg-steps", "2",
        "--predict-size", "32",
        "--precision", "fp32", "--workers", "1"]


def readme_command(heading: str) -> list[str]:
    """The first `weaktr pipeline` command in the README section under `heading`."""
    import re
    import shlex

    text = (REPO / "README.md").read_text()
    section = text[text.index(heading):]
    section = section[:section.index("\n## ", 1)]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, f"no bash block under {heading}"
    command = block.group(1).replace("\\\n", " ")
    (line,) = [c for c in command.splitlines() if c.startswith("weaktr pipeline")]
    return shlex.split(line)


def _tiny_weights(path: Path) -> Path:
    """Random DeiT-Tiny weights in timm's key layout, under the README's file name."""
    import torch

    from weaktr_cli.models.registry import build_vit, get_arch

    torch.manual_seed(0)
    torch.save(build_vit(get_arch("deit-tiny")).state_dict(), path)
    return path


def test_readme_custom_dataset_command_runs_as_written(capsys, tmp_path, monkeypatch) -> None:
    """4 photos without masks, the README's command, tiny settings through the overrides."""
    argv = readme_command("## Bring your own dataset")
    assert argv[:2] == ["weaktr", "pipeline"] and "--pretrained" in argv
    monkeypatch.chdir(tmp_path)
    make_own_dataset(tmp_path / "mydata", 4)
    _tiny_weights(tmp_path / argv[argv.index("--pretrained") + 1])
    result = run_cli(capsys, *argv[1:], *TINY, "--json")
    assert result.code == 0, result.stderr
    payload = json.loads(result.stdout)
    work = Path(argv[argv.index("--work") + 1])
    assert payload["unscored"] == ["mydata/train", "mydata/val"]
    assert payload["pictures"] == [str(work / "panels.png")]
    assert "no pixel labels" in result.stderr
    assert "loaded ImageNet weights from deit_small.pth" in result.stderr  # item 4: logged
    from weaktr_cli.checkpoints import read_checkpoint_meta

    cam, seg = (read_checkpoint_meta(work / name) for name in ("cam.ckpt", "seg.ckpt"))
    assert cam["train"]["batch_size"] == 4 and cam["train"]["epochs"] == 1
    assert seg["train"]["batch_size"] == 2 and seg["step"] == 2
    assert cam["pretrained"] == seg["pretrained"] == "deit_small.pth"
    shown = run_cli(capsys, "show", work / "preds_val.h5", "--out", tmp_path / "v.png", "-q")
    assert shown.code == 0, shown.stderr


def test_pipeline_help_lists_every_recipe_and_the_overrides(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    text = run_cli(capsys, "pipeline", "--help").stdout
    for name in ("shapes", "voc", "coco", "voc-paper", "coco-release"):  # the shipped ones
        assert name in text
    for option in ("--cam-batch-size", "--cam-epochs", "--cam-arch", "--seg-batch-size",
                   "--seg-steps", "--seg-arch", "--precision", "--from-scratch"):
        assert option in text


def test_paper_recipe_without_pretrained_refuses_with_a_hint(capsys, tmp_path: Path) -> None:
    data = make_own_dataset(tmp_path / "mydata", 4)
    for args in (["pipeline", "--work", tmp_path / "run"],
                 ["train-cam", "--out", tmp_path / "cam.ckpt"]):
        result = run_cli(capsys, *args, "--data", "voc", "--data-root", data, "--recipe", "voc")
        assert result.code == 1
        assert "the voc recipe fine-tunes ImageNet weights" in result.stderr, result.stderr
        assert "--pretrained" in result.stderr and "--from-scratch" in result.stderr
    assert not (tmp_path / "run" / "cam.ckpt").exists() and not (tmp_path / "cam.ckpt").exists()
    result = run_cli(capsys, "train-cam", "--data", "voc", "--data-root", data, "--recipe",
                     "voc", "--from-scratch", "--arch", "deit-tiny", "--input-size", "32",
                     "--epochs", "1", "--batch-size", "4", "--precision", "fp32",
                     "--out", tmp_path / "cam.ckpt")
    assert result.code == 0, result.stderr
    assert "from scratch" in result.stderr
