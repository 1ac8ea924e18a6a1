"""Bad inputs read from disk and bad flags through the real CLI: one line, the right exit code.

Each test names the case of docs/RELIABILITY.md it holds ("14.11": issue 14, item 11).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.cli_helpers import run_cli
from weaktr_cli.artifacts import ArtifactWriter, new_meta, open_artifact
from weaktr_cli.checkpoints import META_KEY, save_checkpoint
from weaktr_cli.data.images import write_label_png, write_rgb
from weaktr_cli.data.voc import VOC_CLASSES
from weaktr_cli.errors import WeakTrError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _one_line(stderr: str) -> str:
    """The error line of a failed command; asserts there is nothing else but its hint."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errors = [k for k, ln in enumerate(lines) if ln.startswith("error: ")]
    assert errors, stderr
    lines = lines[errors[0]:]  # progress logs may come first
    assert len(lines) <= 2 and all(ln.startswith(("error: ", "hint: ")) for ln in lines), stderr
    assert "Traceback" not in stderr
    return lines[0]


def _tiny_voc(root: Path, ids: tuple[str, ...] = ("a1", "a2")) -> Path:
    data = root / "VOC2012"
    for k, image_id in enumerate(ids):
        write_rgb(data / "JPEGImages" / f"{image_id}.png", np.full((12, 16, 3), 40 * k, np.uint8))
        label = np.zeros((12, 16), np.uint8)
        label[3:9, 4:12] = 1 + k
        write_label_png(data / "SegmentationClass" / f"{image_id}.png", label)
    lists = data / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    for split in ("train", "val"):
        (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return data


def _tiny_shapes(cache: Path) -> Path:
    from weaktr_cli.data.shapes import ShapesConfig, ensure_shapes

    return ensure_shapes(ShapesConfig(num_train=8, num_val=2, image_size=24), cache_dir=cache)


# ----------------------------------------------------------------------------- datasets


def test_shapes_data_root_typo_generates_nothing(capsys, tmp_path: Path) -> None:
    """14.11: a mistyped --data-root used to get a fresh 52 MB dataset and "ok"."""
    typo = tmp_path / "shapse"
    result = run_cli(capsys, "data", "check", "--data", "shapes", "--data-root", typo)
    assert result.code == 1 and not typo.exists()
    assert "no shapes dataset at" in result.stderr and "does not exist" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(capsys, "train-cam", "--data", "shapes", "--data-root", empty,
                     "--recipe", "smoke", "--out", tmp_path / "cam.ckpt")
    assert result.code == 1 and list(empty.iterdir()) == []
    assert "no shapes dataset at" in _one_line(result.stderr)
    assert "weaktr data shapes --out DIR" in result.stderr
    # Generating is what `weaktr data shapes` is for; its folder is then accepted as a root.
    made = run_cli(capsys, "data", "shapes", "--num-train", "4", "--num-val", "2",
                   "--image-size", "24", "--out", tmp_path / "mine", "-q")
    assert made.code == 0
    folder = made.stdout.strip()
    assert run_cli(capsys, "data", "check", "--data", "shapes", "--data-root", folder).code == 0


def test_show_unknown_id_is_one_line(capsys, tmp_path: Path) -> None:
    """18.12: `show --id nope` used to end in "unexpected KeyError: 'nope'"."""
    data = _tiny_voc(tmp_path / "voc")
    artifact = tmp_path / "labels.h5"
    with ArtifactWriter(artifact, new_meta("labels", "voc", "train", VOC_CLASSES)) as writer:
        writer.write_labels("a1", np.zeros((12, 16), np.uint8))
        writer.finalize()
    result = run_cli(capsys, "show", artifact, "--id", "nope", "--data-root", data,
                     "--out", tmp_path / "p.png")
    assert result.code == 1 and not (tmp_path / "p.png").exists()
    assert "no image 'nope' in voc/train" in _one_line(result.stderr)
    assert "ids look like a1, a2" in result.stderr


def test_exif_rotated_photo_gets_an_upright_mask(capsys, tmp_path: Path) -> None:
    """18.8: a phone photo with EXIF orientation 6 used to get a mask of the unrotated size."""
    from weaktr_cli.models.registry import get_arch
    from weaktr_cli.models.segmenter import build_segmenter

    classes = ["background", "thing"]
    torch.manual_seed(0)
    model = build_segmenter(2, "micro", img_size=32)
    meta = {"kind": "segmenter", "class_names": classes, "dataset": "voc",
            "model": {"arch": "micro", "encoder": dataclasses.asdict(get_arch("micro")),
                      "n_cls": 2, "img_size": 32, "drop_path_rate": 0.0, "decoder_layers": 2,
                      "decoder_dropout": 0.0, "normalization": "imagenet"}}
    ckpt = save_checkpoint(tmp_path / "seg.ckpt", model.state_dict(), meta)
    photos = tmp_path / "photos"
    photos.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait (rotate 90 clockwise)
    Image.fromarray(pixels).save(photos / "phone.jpg", exif=exif, quality=95)
    Image.fromarray(pixels).save(photos / "plain.png")
    out = tmp_path / "preds.h5"
    result = run_cli(capsys, "predict", "--checkpoint", ckpt, "--images", photos, "--out", out,
                     "--crf", "none", "--png-dir", tmp_path / "png", "-q")
    assert result.code == 0, result.stderr
    with open_artifact(out) as reader:
        assert reader.read_labels("phone").shape == (40, 24)  # as the viewer shows it
        assert reader.read_labels("plain").shape == (24, 40)
        assert reader.meta.config["image_orientation"] == "exif"
    assert Image.open(tmp_path / "png" / "phone.png").size == (24, 40)  # (width, height)
    # `show` reads the photos the same way, so the mask lies on the upright photo.
    result = run_cli(capsys, "show", out, "--out", tmp_path / "panels.png", "-q")
    assert result.code == 0, result.stderr
    # A label map of another orientation than its image is refused, not drawn askew.
    from weaktr_cli.data.folder import ImageFolderDataset
    from weaktr_cli.visualize import Layer, panel_row

    class StoredGrid(ImageFolderDataset):
        orientation = "stored"

        def load_image(self, image_id: str) -> np.ndarray:
            from weaktr_cli.data.images import read_rgb

            return read_rgb(self.image_path(image_id))

    with open_artifact(out) as reader, pytest.raises(WeakTrError, match="are 24x40, the image"):
        panel_row(StoredGrid(photos, classes), "phone", [Layer("preds", reader)])


def test_coco_list_file_split_through_the_cli(capsys, tmp_path: Path) -> None:
    """18.9: `--split one_val.txt` with --data coco used to say "unknown COCO split"."""
    from weaktr_cli.data.coco import COCO_CATEGORIES, COCO_CLASSES

    images = []
    for k in (7, 8):
        name = f"COCO_val2014_{k:012d}.png"
        write_rgb(tmp_path / "val2014" / name, np.zeros((10, 12, 3), np.uint8))
        images.append({"id": k, "file_name": name, "height": 10, "width": 12})
    anns = [{"id": 1, "image_id": 8, "category_id": 1, "iscrowd": 0, "area": 4.0,
             "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]]}]
    cats = [{"id": i, "name": n} for i, n in COCO_CATEGORIES.items()]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    listed = tmp_path / "one_val.txt"
    listed.write_text("COCO_val2014_000000000008\n")
    artifact = tmp_path / "gt.h5"
    meta = new_meta("labels", "coco", str(listed), COCO_CLASSES)
    with ArtifactWriter(artifact, meta) as writer:
        label = np.zeros((10, 12), np.uint8)
        label[1:3, 1:3] = 1
        writer.write_labels("COCO_val2014_000000000008", label)
        writer.finalize()
    result = run_cli(capsys, "evaluate", artifact, "--data", "coco", "--data-root", tmp_path,
                     "--split", listed, "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["num_images"] == 1 and report["miou"] == 100.0


# ----------------------------------------------------------------------------- checkpoints


def test_corrupt_checkpoint_metadata_is_one_line(capsys, tmp_path: Path) -> None:
    """14.17: corrupt checkpoint metadata used to be "unexpected JSONDecodeError"."""
    from safetensors.torch import save_file

    for header, expected in (("{not json", "weaktr metadata is not valid JSON"),
                             ('{"format_version": "x"}', "no integer format_version"),
                             ("[1, 2]", "no integer format_version")):
        path = tmp_path / "bad.ckpt"
        save_file({"w": torch.zeros(2)}, str(path), metadata={META_KEY: header})
        result = run_cli(capsys, "predict", "--checkpoint", path, "--images", tmp_path)
        assert result.code == 1 and expected in _one_line(result.stderr)


def test_non_safetensors_checkpoint_hint_names_where_it_goes(capsys, tmp_path: Path) -> None:
    """14.17: the hint suggested --reference-checkpoint, which only dump-cams had; it now names
    the commands that take it, and each of them does."""
    path = tmp_path / "official.pth"
    torch.save({"model": {"w": torch.zeros(2)}}, path)
    for command in (["predict", "--checkpoint", path, "--images", tmp_path],
                    ["export-onnx", "--checkpoint", path, "--out", tmp_path / "m.onnx"],
                    ["evaluate", "--checkpoint", path, "--data-root", tmp_path]):
        result = run_cli(capsys, *command)
        assert result.code == 1
        assert "is not a weaktr checkpoint" in _one_line(result.stderr)
        assert ("--reference-checkpoint (dump-cams, predict, evaluate, export-onnx)"
                in result.stderr)
    for command in ("dump-cams", "predict", "evaluate", "export-onnx"):
        assert "--reference-checkpoint" in run_cli(capsys, command, "--help").stdout


def test_pickled_weights_get_one_line_and_never_the_unsafe_advice(capsys, tmp_path: Path
                                                                  ) -> None:
    """14.17: torch's weights-only failure text advised weights_only=False, on many lines."""
    import os

    class RunsCode:
        def __reduce__(self):
            return os.system, ("true",)

    path = tmp_path / "deit.pth"
    torch.save({"model": RunsCode()}, path)
    result = run_cli(capsys, "train-cam", "--recipe", "smoke", "--pretrained", path,
                     "--data-root", _tiny_shapes(tmp_path), "--out", tmp_path / "cam.ckpt")
    line = _one_line(result.stderr)
    assert result.code == 1 and "weights_only" not in result.stderr
    assert "holds objects weaktr will not unpickle" in line and "system" in line


def test_pretrained_weaktr_checkpoint_is_named(capsys, tmp_path: Path) -> None:
    """14.17: `train-cam --pretrained cam.ckpt` failed with unpickler text."""
    path = save_checkpoint(tmp_path / "cam.ckpt", {"w": torch.zeros(2)}, {"kind": "cam"})
    result = run_cli(capsys, "train-cam", "--recipe", "smoke", "--pretrained", path,
                     "--data-root", _tiny_shapes(tmp_path), "--out", tmp_path / "again.ckpt")
    assert result.code == 1
    assert "is a weaktr 'cam' checkpoint, not ImageNet ViT weights" in _one_line(result.stderr)
    assert "--resume" in result.stderr


# ----------------------------------------------------------------------------- the boundary


def test_ctrl_c_says_how_to_resume(capsys, monkeypatch) -> None:
    """14.14 / 18.12: Typer turned Ctrl-C into a silent exit 130."""
    import weaktr_cli.data as data

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "resolve_root", interrupted)  # the first step of `data check`
    result = run_cli(capsys, "data", "check", "--data", "voc", "--data-root", ".")
    assert result.code == 130
    assert _one_line(result.stderr) == "error: interrupted"
    assert "rerun the same command to resume" in result.stderr


def test_did_you_mean_is_said_once(capsys) -> None:
    """18.12: `Did you mean 'dump-cams'? Did you mean 'dump-cams'?`."""
    for args, suggestion in ((["dump-cam"], "'dump-cams'"), (["data", "chek"], "'check'")):
        result = run_cli(capsys, *args)
        assert result.code == 2 and result.stderr.count("Did you mean") == 1
        assert f"Did you mean {suggestion}?" in result.stderr


def test_bad_image_in_a_loader_worker_is_one_line(capsys, tmp_path: Path) -> None:
    """14.15: `train-cam --workers 2` printed the DataLoader worker's whole traceback."""
    voc = _tiny_shapes(tmp_path)
    bad = sorted((voc / "JPEGImages").glob("shapes_train_*.png"))
    assert len(bad) == 8
    for path in bad:
        path.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = run_cli(capsys, "train-cam", "--data-root", voc, "--recipe", "smoke",
                     "--workers", "2", "--out", tmp_path / "cam.ckpt")
    assert result.code == 1, result.stderr
    line = _one_line(result.stderr)
    assert line.startswith("error: cannot read image ") and "train_" in line
    assert "DataLoader worker" not in result.stderr
    assert "hint: the file is corrupt or truncated" in result.stderr


# ----------------------------------------------------------------------------- large images


def _old_infer_cams(model, images, class_ids, settings, precision):
    """The former `infer_cams`: every class upsampled to full size at once (C x H x W)."""
    from torch.nn import functional as F

    from weaktr_cli.cams import normalize_maps
    from weaktr_cli.data.loader import normalize
    from weaktr_cli.models.cam_vit import cam_maps
    from weaktr_cli.runtime import autocast

    b, _, height, width = images.shape
    total = torch.zeros(b, model.num_classes, height, width)
    pixels = images.float()
    for scale in settings.scales:
        size = (max(round(height * scale), model.patch_size),
                max(round(width * scale), model.patch_size))
        scaled = pixels if size == (height, width) else F.interpolate(
            pixels, size=size, mode="bicubic", align_corners=False)
        batch = normalize(scaled.clamp(0, 255))
        batch = torch.cat([batch, batch.flip(-1)])
        with autocast(torch.device("cpu"), precision):
            maps = cam_maps(model, batch, settings.variant)
        maps = F.interpolate(maps.float(), size=(height, width), mode="bilinear",
                             align_corners=False)
        total += maps[:b]
        total += maps[b:].flip(-1)
    return [normalize_maps(total[i, torch.as_tensor(ids - 1)]).numpy()
            for i, ids in enumerate(class_ids)]


@torch.inference_mode()
def test_large_image_cams_hold_only_the_present_classes(monkeypatch) -> None:
    """14.12: a 6000x4000 photo needed C full-size maps per pass ("can't allocate 4.4 GB");
    now only the present classes, one map at a time, and the model sees <= max_size pixels."""
    import weaktr_cli.cams as cams
    from weaktr_cli.models.cam_vit import WeakTrCAM

    torch.manual_seed(0)
    model = WeakTrCAM("micro", 20).eval()
    images = torch.from_numpy(
        np.random.default_rng(0).integers(0, 256, (1, 3, 90, 130), dtype=np.uint8))
    labels = [np.array([3, 12])]
    settings = cams.CamSettings(scales=(1.0, 0.5), flip=True, variant="fine", precision="fp32",
                                max_size=None)
    # Unlimited size: the same numbers as the former all-classes code, to the last bit.
    got = cams.infer_cams(model, images, labels, settings, torch.device("cpu"), "fp32")
    np.testing.assert_array_equal(got[0], _old_infer_cams(model, images, labels, settings,
                                                         "fp32")[0])
    # The largest tensor at full size is one class map; the model input is capped.
    seen: list[tuple[int, ...]] = []
    interpolate = cams.F.interpolate

    def recording(x, *args, **kwargs):
        out = interpolate(x, *args, **kwargs)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(cams.F, "interpolate", recording)
    capped = dataclasses.replace(settings, max_size=64)
    maps = cams.infer_cams(model, images, labels, capped, torch.device("cpu"), "fp32")[0]
    assert maps.shape == (2, 90, 130) and maps.min() >= 0.0 and maps.max() <= 1.0
    full = [s for s in seen if s[-2:] == (90, 130)]
    assert full and all(int(np.prod(s)) == 90 * 130 for s in full)  # (1, 1, H, W) each
    model_inputs = [s for s in seen if s[1] == 3]
    assert model_inputs and max(max(s[-2:]) for s in model_inputs) <= 64  # 130 -> 64 long side


def test_max_size_flag(capsys) -> None:
    """14.12: --max-size is a documented flag; a value below a patch is one line."""
    from weaktr_cli.cams import CamSettings

    result = run_cli(capsys, "dump-cams", "--help")
    assert "--max-size" in result.stdout and "no limit" in result.stdout
    with pytest.raises(WeakTrError, match="invalid max size 8"):
        CamSettings(max_size=8).check()
    CamSettings(max_size=None).check()


def test_non_integer_schema_version_is_one_line(capsys, tmp_path: Path) -> None:
    """14.17: a non-integer schema_version used to be "unexpected ValueError"."""
    import h5py

    for name, value in (("schema_version", "two"), ("seed", "x")):
        path = tmp_path / f"{name}.h5"
        with ArtifactWriter(path, new_meta("labels", "voc", "train", VOC_CLASSES)) as writer:
            writer.write_labels("a1", np.zeros((4, 4), np.uint8))
            writer.finalize()
        with h5py.File(path, "r+") as h5:
            h5.attrs[name] = value
        result = run_cli(capsys, "inspect", path)
        assert result.code == 1
        assert f"root attribute '{name}' is '{value}', not an integer" in _one_line(result.stderr)


# ----------------------------------------------------------------------------- flags


@pytest.fixture
def shapes_seeds(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny shapes dataset and a labels artifact over its train split (its own masks)."""
    from weaktr_cli.data.shapes import open_shapes

    voc = _tiny_shapes(tmp_path)
    dataset = open_shapes("train", root=voc)
    seeds = tmp_path / "seeds.h5"
    meta = new_meta("labels", "shapes", "train", dataset.class_names)
    with ArtifactWriter(seeds, meta) as writer:
        for image_id in dataset.ids:
            writer.write_labels(image_id, dataset.load_mask(image_id))
        writer.finalize()
    return voc, seeds


@pytest.mark.parametrize("tau", ["0", "-1", "0.0"])
def test_retrain_tau_that_never_clips_is_refused(capsys, tmp_path: Path, shapes_seeds,
                                                 tau: str) -> None:
    """14.16: --tau 0 or negative was accepted, and clipping then never started."""
    voc, seeds = shapes_seeds
    # A run that would finish in one step: only the tau can stop it.
    result = run_cli(capsys, "retrain", "--seeds", seeds, "--data-root", voc, "--tau", tau,
                     "--batch-size", "4", "--iterations", "1", "--out", tmp_path / "seg.ckpt")
    assert result.code == 1 and not (tmp_path / "seg.ckpt").exists()
    assert "clipping would never start" in _one_line(result.stderr)


def test_retrain_no_clip_with_tau_is_refused(capsys, tmp_path: Path, shapes_seeds) -> None:
    """14.16: `--no-clip --tau 1.0` was silently accepted (the tau did nothing)."""
    voc, seeds = shapes_seeds
    result = run_cli(capsys, "retrain", "--seeds", seeds, "--data-root", voc, "--no-clip",
                     "--tau", "1.0", "--batch-size", "4", "--iterations", "1",
                     "--out", tmp_path / "seg.ckpt")
    assert result.code == 1 and not (tmp_path / "seg.ckpt").exists()
    assert "--no-clip and --tau 1.0 contradict each other" in _one_line(result.stderr)


@pytest.mark.parametrize("flags, named", [
    (["--preset", "voc"], "--preset voc"),
    (["--gt-prob", "0.9", "--iterations", "5"], "--gt-prob, --iterations"),
])
def test_crf_no_crf_with_crf_parameters_is_refused(capsys, tmp_path: Path, flags: list[str],
                                                   named: str) -> None:
    """14.16: `--no-crf --preset voc` was silently accepted (the preset did nothing)."""
    voc = _tiny_shapes(tmp_path)
    cams = tmp_path / "cams.h5"
    from weaktr_cli.data.shapes import open_shapes

    dataset = open_shapes("train", root=voc)
    with ArtifactWriter(cams, new_meta("cams", "shapes", "train", dataset.class_names)) as writer:
        for image_id in dataset.ids:
            h, w = dataset.load_mask(image_id).shape
            ids = dataset.image_labels(image_id)
            writer.write_cams(image_id, ids, np.zeros((len(ids), h, w), np.float32))
        writer.finalize()
    result = run_cli(capsys, "crf", "--cams", cams, "--data-root", voc, "--no-crf", *flags,
                     "--out", tmp_path / "seeds.h5")
    assert result.code == 1 and not (tmp_path / "seeds.h5").exists()
    assert f"--no-crf and {named} contradict each other" in _one_line(result.stderr)
