"""Artifacts on a bad day (issue 14): two writers, a full disk, a damaged partial file, an
output that is an input, NaN CAMs, shards of different runs, resumes that must equal a clean run.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.cli_helpers import run_cli
from weaktr_cli.artifact_writer import ArtifactWriter, merge_artifacts, write_artifact
from weaktr_cli.artifacts import CamRecord, new_meta, open_artifact
from weaktr_cli.errors import WeakTrError

REPO = Path(__file__).resolve().parents[1]
NAMES = ("background", "a", "b", "c")
IDS = [f"id{i}" for i in range(6)]


def _meta(kind: str = "labels", config: dict | None = None, **kw):
    return new_meta(kind, "toy", "train", NAMES, seed=3, config=config or {"x": 1}, **kw)


def _label(image_id: str) -> np.ndarray:
    rng = np.random.default_rng(int(image_id[2:]))
    return rng.integers(0, 4, (24, 31)).astype(np.uint8)


def _write(out: Path, *, meta=None, stop_after: int | None = None, resume: bool = True) -> Path:
    """The per-image loop over IDS; `stop_after` interrupts it like a Ctrl-C."""

    def produce(todo: list[str]):
        for image_id in todo:
            yield image_id, _label(image_id)

    def progress(done: int, total: int) -> None:
        if stop_after is not None and done == stop_after:
            raise KeyboardInterrupt

    return write_artifact(out, meta or _meta(), IDS, produce, resume=resume, progress=progress)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generated shapes dataset (its VOC2012 folder) for the CLI cases."""
    from weaktr_cli.data.shapes import ShapesConfig, ensure_shapes

    config = ShapesConfig(num_train=6, num_val=2, image_size=32, seed=5)
    return ensure_shapes(config, cache_dir=tmp_path_factory.mktemp("shapes"))


def _shapes_cams(path: Path, root: Path, bad: float | None = None) -> Path:
    """A finished cams artifact of the tiny shapes train split (blobs where the classes are);
    `bad` puts one NaN / Inf pixel in the first image's maps (as a third party's file could)."""
    from weaktr_cli.data import open_dataset

    dataset = open_dataset("shapes", "train", root)
    with h5py.File(path, "w") as f:
        f.attrs.update({"weaktr_kind": "cams", "schema_version": 1, "dataset": "shapes",
                        "split": "train", "class_names": json.dumps(list(dataset.class_names))})
        for n, image_id in enumerate(dataset.ids):
            ids = dataset.image_labels(image_id)
            h, w = dataset.load_image(image_id).shape[:2]
            y, x = np.mgrid[0:h, 0:w] / max(h, w)
            maps = np.stack([np.exp(-((y - 0.5) ** 2 + (x - k / 4) ** 2) * 8) for k in ids])
            if bad is not None and n == 0:
                maps[0, 1, 2] = bad
            ds = f.create_dataset(f"cams/{image_id}", data=maps.astype(np.float16))
            ds.attrs["class_ids"] = ids.astype(np.int16)
    return path


@pytest.fixture
def pinned_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs write the same `created` time, so whole files can be compared."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")


# ---------------------------------------------------------------------- 14.1 two writers


def test_second_writer_is_refused_and_the_first_finishes(tmp_path: Path) -> None:
    out = tmp_path / "seeds.h5"
    first = ArtifactWriter(out, _meta())
    for image_id in IDS[:3]:
        first.write_labels(image_id, _label(image_id))
    with pytest.raises(WeakTrError, match=rf"being written by another weaktr process \(PID "
                                          rf"{os.getpid()}\)"):
        ArtifactWriter(out, _meta())
    with pytest.raises(WeakTrError, match="being written"):
        ArtifactWriter(out, _meta(), resume=False)
    for image_id in IDS[3:]:
        first.write_labels(image_id, _label(image_id))
    first.finalize()
    with open_artifact(out) as reader:
        assert reader.ids == IDS
        assert all(np.array_equal(reader.read_labels(i), _label(i)) for i in IDS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seeds.h5"]  # lock, journal gone


def test_second_cli_writer_gets_one_line_naming_the_holder(tmp_path: Path, capsys,
                                                           shapes: Path) -> None:
    cams = _shapes_cams(tmp_path / "cams.h5", shapes)
    out = tmp_path / "seeds.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from weaktr_cli.artifact_writer import ArtifactWriter
            from weaktr_cli.artifacts import new_meta
            w = ArtifactWriter({str(out)!r}, new_meta("labels", "toy", "train", ["background"]))
            print("ready", flush=True)
            sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        result = run_cli(capsys, "crf", "--cams", cams, "--data-root", shapes, "--out", out)
    finally:
        holder.communicate("\n", timeout=60)
    assert result.code == 1
    assert f"is being written by another weaktr process (PID {holder.pid})" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 2


# ---------------------------------------------------------------------- 14.3 full disk


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


FILL = """
import os
import sys
import numpy as np
from weaktr_cli.artifact_writer import write_artifact
from weaktr_cli.artifacts import new_meta
ids = [f"id{i:03d}" for i in range(60)]
def produce(todo):
    for image_id in todo:
        rng = np.random.default_rng(int(image_id[2:]))
        yield image_id, rng.integers(0, 4, (40, 50)).astype(np.uint8)
meta = new_meta("labels", "toy", "train", ["background", "a", "b", "c"], config={"x": 1})
def progress(done, total):  # a hard stop after EXIT_AFTER images: no close, no cleanup
    if done == int(os.environ.get("EXIT_AFTER", "-1")):
        os._exit(3)
write_artifact(sys.argv[1], meta, ids, produce, progress=progress)
"""


def _fill(out: Path, limit: int | None, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the writer in a child under a file-size limit (`ulimit -f`), through the CLI's error
    boundary."""
    code = ("from weaktr_cli.commands.app import _fail\nfrom weaktr_cli.errors import WeakTrError"
            "\ntry:\n" + textwrap.indent(FILL, "    ") +
            "except WeakTrError as exc:\n    _fail(exc.message, exc.hint)\n")

    def limit_size() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    # The same relative argv in both folders: the recorded command line is equal too.
    return subprocess.run([sys.executable, "-c", code, out.name], capture_output=True,
                          text=True, cwd=out.parent,
                          env=_env(SOURCE_DATE_EPOCH="1700000000", **env),
                          preexec_fn=limit_size, timeout=120)


def test_full_disk_is_one_line_and_a_rerun_completes(tmp_path: Path) -> None:
    (tmp_path / "clean").mkdir()
    clean = tmp_path / "clean" / "out.h5"
    assert _fill(clean, None).returncode == 0
    out = tmp_path / "out.h5"
    previous = out.write_bytes(b"the previous artifact") and out.read_bytes()
    for limit in (clean.stat().st_size // 2, clean.stat().st_size * 3 // 4):
        failed = _fill(out, limit)
        assert failed.returncode == 1, failed.stderr  # not 139 (segfault)
        assert "File too large" in failed.stderr and "Traceback" not in failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 2  # error + hint
        assert out.read_bytes() == previous  # the final path is untouched
    again = _fill(out, None)
    assert again.returncode == 0, again.stderr
    assert out.read_bytes() == clean.read_bytes()


# ---------------------------------------------------------------------- 14.4 resume checks


def _chunk_offset(partial: Path, image_id: str) -> int:
    with h5py.File(partial, "r") as f:
        return int(f["labels"][image_id].id.get_chunk_info(0).byte_offset)


def test_resume_redoes_a_damaged_entry_and_says_so(tmp_path: Path, caplog, pinned_time) -> None:
    clean = _write(tmp_path / "clean.h5")
    out = tmp_path / "out.h5"
    with pytest.raises(KeyboardInterrupt):
        _write(out, stop_after=4)
    partial = tmp_path / "out.h5.partial"
    offset = _chunk_offset(partial, "id2")
    data = bytearray(partial.read_bytes())
    data[offset + 5] ^= 0xFF
    partial.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        _write(out)
    assert "image 'id2'" in caplog.text and "keeping the 2 images before it" in caplog.text
    assert out.read_bytes() == clean.read_bytes()


def test_resume_of_an_unreadable_partial_starts_over_and_says_so(tmp_path: Path, caplog) -> None:
    out = tmp_path / "out.h5"
    (tmp_path / "out.h5.partial").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 500)
    with caplog.at_level(logging.WARNING):
        _write(out)
    assert "cannot be read" in caplog.text and "starting over" in caplog.text
    with open_artifact(out) as reader:
        assert reader.ids == IDS


def test_resume_with_other_settings_suggests_no_resume(tmp_path: Path) -> None:
    out = tmp_path / "out.h5"
    with pytest.raises(KeyboardInterrupt):
        _write(out, stop_after=2)
    with pytest.raises(WeakTrError, match="other settings") as info:
        _write(out, meta=_meta(config={"x": 2}))
    assert info.value.hint is not None and "--no-resume" in info.value.hint
    _write(out, meta=_meta(config={"x": 2}), resume=False)
    assert open_artifact(out).meta.config == {"x": 2}


# ---------------------------------------------------------------------- 14.5 inputs as outputs


def test_crf_out_equal_to_its_cams_is_refused(tmp_path: Path, capsys, shapes: Path) -> None:
    cams = _shapes_cams(tmp_path / "cams.h5", shapes)
    before = cams.read_bytes()
    link = tmp_path / "link.h5"
    link.symlink_to(cams)
    for out in (cams, link):
        result = run_cli(capsys, "crf", "--cams", cams, "--data-root", shapes, "--out", out)
        assert result.code == 1 and "is also an input of this run" in result.stderr
    assert cams.read_bytes() == before and not (tmp_path / "cams.h5.partial").exists()


def test_dump_cams_out_equal_to_its_checkpoint_is_refused(tmp_path: Path, capsys,
                                                          shapes: Path) -> None:
    from weaktr_cli.checkpoints import save_checkpoint
    from weaktr_cli.data import open_dataset
    from weaktr_cli.models.cam_vit import WeakTrCAM

    model = WeakTrCAM("micro", open_dataset("shapes", "train", shapes).num_classes - 1)
    ckpt = tmp_path / "cam.ckpt"
    save_checkpoint(ckpt, model.state_dict(), {"kind": "cam", "model": model.config(),
                                               "dataset": "shapes"})
    before = ckpt.read_bytes()
    result = run_cli(capsys, "dump-cams", "--checkpoint", ckpt, "--data-root", shapes,
                     "--out", ckpt)
    assert result.code == 1 and "is also an input of this run" in result.stderr, result.stderr
    assert ckpt.read_bytes() == before


def test_png_dir_in_ground_truth_folder_is_refused(tmp_path: Path, capsys) -> None:
    gt = tmp_path / "VOC2012" / "SegmentationClass"
    gt.mkdir(parents=True)
    (gt / "x.png").write_bytes(b"ground truth")
    ckpt = tmp_path / "seg.ckpt"
    ckpt.write_bytes(b"not reached")
    for folder in (gt, gt / "sub"):
        result = run_cli(capsys, "predict", "--checkpoint", ckpt, "--png-dir", folder,
                         "--out", tmp_path / "p.h5")
        assert result.code == 1 and "ground-truth folder" in result.stderr, result.stderr
    assert (gt / "x.png").read_bytes() == b"ground truth"


# ---------------------------------------------------------------------- 14.6 NaN CAMs


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_cams_are_refused_by_the_reader(tmp_path: Path, capsys, shapes: Path,
                                                   bad: float) -> None:
    path = _shapes_cams(tmp_path / "cams.h5", shapes, bad=bad)
    with open_artifact(path) as reader, pytest.raises(WeakTrError, match="NaN or Inf"):
        reader.read_cams(reader.ids[0])
    for args in (["crf", "--cams", path, "--no-crf", "--out", tmp_path / "s.h5"],
                 ["evaluate", path]):
        result = run_cli(capsys, *args, "--data-root", shapes)
        assert result.code == 1, (args, result.stderr)
        assert "contain NaN or Inf values" in result.stderr and "Traceback" not in result.stderr
    with open_artifact(_shapes_cams(tmp_path / "ok.h5", shapes)) as reader:
        assert np.isfinite(reader.read_cams(reader.ids[0]).maps).all()


# ---------------------------------------------------------------------- 14.8 merge


def _shard(path: Path, k: int, config: dict, seed: int = 3) -> Path:
    meta = new_meta("labels", "toy", "train", NAMES, seed=seed, config={**config, "shard": [k, 2]})
    with ArtifactWriter(path, meta) as writer:
        for image_id in IDS[k - 1 :: 2]:
            writer.write_labels(image_id, _label(image_id))
        return writer.finalize()


def test_merge_refuses_shards_of_other_settings(tmp_path: Path) -> None:
    one = _shard(tmp_path / "s1.h5", 1, {"variant": "fine", "scales": [1.0]})
    other = _shard(tmp_path / "s2.h5", 2, {"variant": "coarse", "scales": [1.0]})
    with pytest.raises(WeakTrError, match=r"other settings.*variant: 'fine' vs 'coarse'"):
        merge_artifacts([one, other], tmp_path / "m.h5")
    reseeded = _shard(tmp_path / "s3.h5", 2, {"variant": "fine", "scales": [1.0]}, seed=4)
    with pytest.raises(WeakTrError, match="seed: 3 vs 4"):
        merge_artifacts([one, reseeded], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()


def test_merge_provenance_names_every_shard(tmp_path: Path) -> None:
    ckpt = tmp_path / "cam.ckpt"
    ckpt.write_bytes(b"weights")
    shards = []
    for k in (1, 2):
        meta = new_meta("labels", "toy", "train", NAMES, seed=3,
                        config={"variant": "fine", "shard": [k, 2]}, parents=[ckpt])
        with ArtifactWriter(tmp_path / f"s{k}.h5", meta) as writer:
            for image_id in IDS[k - 1 :: 2]:
                writer.write_labels(image_id, _label(image_id))
            shards.append(writer.finalize())
    merged = merge_artifacts(shards, tmp_path / "m.h5", order=IDS)
    meta = open_artifact(merged).meta
    assert meta.config["shard"] is None and meta.config["variant"] == "fine"
    assert meta.config["merged_shards"] == [[1, 2], [2, 2]]
    assert [p["path"] for p in meta.parents] == [str(s.resolve()) for s in shards]
    assert [p["path"] for p in meta.config["merged_parents"]] == [str(ckpt.resolve())]
    assert meta.seed == 3
    with pytest.raises(WeakTrError, match="also an input"):
        merge_artifacts(shards, shards[0])


# ---------------------------------------------------------------------- 14.13 bad --out


def test_out_that_is_a_folder_is_refused_before_the_run(tmp_path: Path, capsys,
                                                        shapes: Path) -> None:
    cams = _shapes_cams(tmp_path / "cams.h5", shapes)
    folder = tmp_path / "seeds"
    folder.mkdir()
    result = run_cli(capsys, "crf", "--cams", cams, "--data-root", shapes, "--out", folder)
    assert result.code == 1 and "--out" in result.stderr and "is an existing folder" \
        in result.stderr, result.stderr
    assert list(folder.iterdir()) == [] and not (tmp_path / "seeds.partial").exists()


def test_unwritable_output_folder_is_refused_before_the_run(
        tmp_path: Path, capsys, shapes: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cams = _shapes_cams(tmp_path / "cams.h5", shapes)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: let the OS answer as it would for a user
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == folder
                            else real_access(p, mode))
    result = run_cli(capsys, "crf", "--cams", cams, "--data-root", shapes,
                     "--out", folder / "s.h5")
    folder.chmod(0o755)
    assert result.code == 1 and f"output folder {folder} is not writable" in result.stderr
    assert "corrupt" not in result.stderr and list(folder.iterdir()) == []


# ---------------------------------------------------------------------- 14.18 byte-identical


def test_hard_stopped_then_resumed_equals_a_clean_run_byte_for_byte(tmp_path: Path) -> None:
    """A process that dies without closing the file (as after SIGKILL) and is rerun."""
    (tmp_path / "clean").mkdir()
    clean = tmp_path / "clean" / "out.h5"
    assert _fill(clean, None).returncode == 0
    out = tmp_path / "out.h5"
    for stop in (7, 23, 41):
        assert _fill(out, None, EXIT_AFTER=str(stop)).returncode == 3
        assert not out.exists()
    assert _fill(out, None).returncode == 0
    assert out.read_bytes() == clean.read_bytes()



def test_interrupted_then_resumed_equals_a_clean_run_byte_for_byte(
        tmp_path: Path, pinned_time) -> None:
    clean = _write(tmp_path / "clean.h5")
    for stop in (1, 3, 5):
        out = tmp_path / f"out{stop}.h5"
        with pytest.raises(KeyboardInterrupt):
            _write(out, stop_after=stop)
        _write(out)
        assert out.read_bytes() == clean.read_bytes(), stop


def test_resumed_dump_cams_equals_a_clean_run_byte_for_byte(
        tmp_path: Path, shapes: Path, pinned_time, one_torch_thread) -> None:
    import torch

    from weaktr_cli.cams import CamSettings, dump_cams
    from weaktr_cli.data import open_dataset
    from weaktr_cli.models.cam_vit import WeakTrCAM
    from weaktr_cli.per_image import PerImageRun

    dataset = open_dataset("shapes", "train", shapes)
    torch.manual_seed(0)
    model = WeakTrCAM("micro", dataset.num_classes - 1).eval()
    settings = CamSettings(scales=(1.0,), precision="fp32", batch_size=2)
    clean = dump_cams(model, PerImageRun(dataset, tmp_path / "clean.h5", "cpu"),
                      settings=settings)

    def stop(done: int, total: int) -> None:
        if done == 4:
            raise KeyboardInterrupt

    out = tmp_path / "cams.h5"
    with pytest.raises(KeyboardInterrupt):
        dump_cams(model, PerImageRun(dataset, out, "cpu", progress=stop), settings=settings)
    assert len(open_artifact_ids(tmp_path / "cams.h5.partial")) == 4
    dump_cams(model, PerImageRun(dataset, out, "cpu"), settings=settings)
    assert out.read_bytes() == clean.read_bytes()


def open_artifact_ids(partial: Path) -> list[str]:
    with h5py.File(partial, "r") as f:
        return list(f["cams"])


def test_write_dispatches_on_kind(tmp_path: Path) -> None:
    with ArtifactWriter(tmp_path / "c.h5", _meta("cams")) as writer:
        writer.write("a", CamRecord(class_ids=np.array([2]), maps=np.ones((1, 2, 3), np.float32)))
        with pytest.raises(TypeError):
            writer.write("b", np.zeros((2, 3), np.uint8))
        with pytest.raises(ValueError, match="written twice"):
            writer.write("a", CamRecord(class_ids=np.array([2]), maps=np.ones((1, 2, 3))))
        writer.finalize()
    assert open_artifact(tmp_path / "c.h5").read_cams("a").class_ids.tolist() == [2]
