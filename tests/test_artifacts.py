from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from weaktr_cli.artifacts import (
    SCHEMA_VERSION,
    ArtifactWriter,
    merge_artifacts,
    new_meta,
    open_artifact,
)
from weaktr_cli.errors import WeakTrError

NAMES = ("background", "a", "b", "c")


def _meta(kind: str = "cams", **kw):
    return new_meta(kind, "toy", "train", NAMES, seed=3, config={"x": 1}, **kw)


def _cams(rng: np.random.Generator, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(1, k + 1), rng.random((k, 7, 9)).astype(np.float32)


def test_cams_roundtrip_and_provenance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the command line as the user typed it: program name without its folder, shell-quoted
    monkeypatch.setattr(sys, "argv", ["/opt/venv/bin/weaktr", "dump-cams", "--out", "my cams.h5"])
    rng = np.random.default_rng(0)
    out = tmp_path / "cams.h5"
    written = {}
    with ArtifactWriter(out, _meta()) as writer:
        for i in range(3):
            ids, maps = _cams(rng, k=i + 1)
            writer.write_cams(f"img/{i}%", ids, maps)  # ids with / and % survive escaping
            written[f"img/{i}%"] = (ids, maps)
        assert not out.exists()  # nothing at the final path before finalize
        writer.finalize()
    with open_artifact(out, kind="cams") as reader:
        assert reader.ids == list(written)
        assert reader.meta.class_names == NAMES
        assert reader.meta.seed == 3 and reader.meta.config == {"x": 1}
        assert reader.meta.schema_version == SCHEMA_VERSION
        assert reader.meta.command == "weaktr dump-cams --out 'my cams.h5'"
        for image_id, (ids, maps) in written.items():
            record = reader.read_cams(image_id)
            np.testing.assert_array_equal(record.class_ids, ids)
            # float16 storage: error bounded by half an ulp of values in [0, 1]
            assert np.abs(record.maps - maps).max() <= 2.0**-11
        assert "img/0%" in reader and "nope" not in reader


def test_labels_roundtrip_and_parents(tmp_path: Path) -> None:
    parent = tmp_path / "parent.bin"
    parent.write_bytes(b"abc")
    out = tmp_path / "seeds.h5"
    label = np.array([[0, 1, 255], [2, 3, 0]], dtype=np.uint8)
    with ArtifactWriter(out, _meta("labels", parents=[parent])) as writer:
        writer.write_labels("a", label)
        writer.finalize()
    with open_artifact(out, kind="labels") as reader:
        np.testing.assert_array_equal(reader.read_labels("a"), label)
        (p,) = reader.meta.parents
        assert p["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_resume_skips_written_ids(tmp_path: Path) -> None:
    out = tmp_path / "seeds.h5"
    writer = ArtifactWriter(out, _meta("labels"))
    writer.write_labels("a", np.zeros((2, 2), np.uint8))
    writer.close()  # interrupted: partial file stays
    assert (tmp_path / "seeds.h5.partial").exists() and not out.exists()
    with ArtifactWriter(out, _meta("labels")) as again:
        assert again.done_ids == {"a"}
        again.write_labels("b", np.ones((2, 2), np.uint8))
        again.finalize()
    with open_artifact(out) as reader:
        assert reader.ids == ["a", "b"]


def test_resume_of_other_content_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "x.h5"
    ArtifactWriter(out, _meta("labels")).close()
    with pytest.raises(WeakTrError, match="other content"):
        ArtifactWriter(out, _meta("cams"))


def test_unreadable_partial_restarts(tmp_path: Path) -> None:
    out = tmp_path / "x.h5"
    (tmp_path / "x.h5.partial").write_bytes(b"garbage")
    with ArtifactWriter(out, _meta("labels")) as writer:
        assert writer.done_ids == set()


def test_plain_h5py_file_following_docs_is_accepted(tmp_path: Path) -> None:
    """A third party writes an artifact with h5py alone, as docs/artifacts.md describes."""
    path = tmp_path / "third_party.h5"
    with h5py.File(path, "w") as f:
        f.attrs["weaktr_kind"] = "cams"
        f.attrs["schema_version"] = 1
        f.attrs["dataset"] = "voc"
        f.attrs["split"] = "val"
        f.attrs["class_names"] = json.dumps(["background", "cat", "dog"])
        ds = f.create_dataset("cams/2007_000033", data=np.full((1, 4, 5), 0.5, np.float16))
        ds.attrs["class_ids"] = np.array([2], np.int16)
    with open_artifact(path) as reader:
        assert reader.ids == ["2007_000033"]
        record = reader.read_cams("2007_000033")
        assert record.class_ids.tolist() == [2] and record.size == (4, 5)
        assert reader.meta.seed is None and reader.meta.parents == []


def test_docs_describe_every_root_attribute() -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "artifacts.md").read_text()
    for attr in ("weaktr_kind", "schema_version", "dataset", "split", "class_names", "command",
                 "weaktr_version", "seed", "created", "config", "parents", "class_ids"):
        assert f"`{attr}`" in docs


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f.attrs.__setitem__("schema_version", SCHEMA_VERSION + 1), "newer"),
        (lambda f: f.attrs.__delitem__("weaktr_kind"), "not a weaktr artifact"),
        (lambda f: f.attrs.__setitem__("weaktr_kind", "bogus"), "unknown kind"),
        (lambda f: f.attrs.__setitem__("class_names", "[1, 2"), "not valid JSON"),
    ],
)
def test_bad_files_fail_clearly(tmp_path: Path, mutate, message: str) -> None:
    out = tmp_path / "a.h5"
    with ArtifactWriter(out, _meta("labels")) as writer:
        writer.write_labels("a", np.zeros((2, 2), np.uint8))
        writer.finalize()
    with h5py.File(out, "a") as f:
        mutate(f)
    with pytest.raises(WeakTrError, match=message):
        open_artifact(out)


def test_truncated_and_missing_files(tmp_path: Path) -> None:
    out = tmp_path / "a.h5"
    with ArtifactWriter(out, _meta("labels")) as writer:
        writer.write_labels("a", np.zeros((50, 50), np.uint8))
        writer.finalize()
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 3])
    with pytest.raises(WeakTrError, match="truncated or corrupt"):
        open_artifact(out)
    with pytest.raises(WeakTrError, match="does not exist"):
        open_artifact(tmp_path / "missing.h5")
    with pytest.raises(WeakTrError, match=r"not 'cams'|a 'cams' artifact is needed"):
        out.write_bytes(data)
        open_artifact(out, kind="cams")


def test_nan_cams_are_rejected(tmp_path: Path) -> None:
    with (
        ArtifactWriter(tmp_path / "c.h5", _meta()) as writer,
        pytest.raises(WeakTrError, match="NaN"),
    ):
        writer.write_cams("a", np.array([1]), np.full((1, 2, 2), np.nan, np.float32))


def test_merge_shards(tmp_path: Path) -> None:
    shards = []
    for k in range(2):
        path = tmp_path / f"s{k}.h5"
        with ArtifactWriter(path, _meta("labels")) as writer:
            for i in range(k, 6, 2):
                writer.write_labels(f"id{i}", np.full((2, 2), i, np.uint8))
            writer.finalize()
        shards.append(path)
    merged = merge_artifacts(shards, tmp_path / "all.h5", order=[f"id{i}" for i in range(6)])
    with open_artifact(merged) as reader:
        assert reader.ids == [f"id{i}" for i in range(6)]
        assert int(reader.read_labels("id5")[0, 0]) == 5
        assert len(reader.meta.parents) == 2
    with pytest.raises(WeakTrError, match="in both"):
        merge_artifacts([shards[0], shards[0]], tmp_path / "dup.h5")
