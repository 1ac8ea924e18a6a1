"""weaktr_cli.h5_probe: a crash while reading a damaged file stays in the child."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest

from weaktr_cli import h5_probe

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as h5:
        h5.attrs["meta"] = "{}"
        h5.create_dataset("cams/img0", data=np.arange(12, dtype=np.float32))
    return path


def test_a_readable_file_passes(tmp_path: Path) -> None:
    assert h5_probe.reads_without_crashing(_file(tmp_path))


def test_a_file_hdf5_refuses_passes_for_the_caller_to_report(tmp_path: Path) -> None:
    path = tmp_path / "junk.h5"
    path.write_bytes(b"not an hdf5 file at all")
    assert h5_probe.reads_without_crashing(path)


def test_a_crash_while_reading_is_reported_not_shared(tmp_path: Path, monkeypatch) -> None:
    # Stand in for libhdf5 segfaulting on a damaged dataset: the child dies by SIGSEGV.
    def crash(_path: Path, _root_only: bool) -> None:
        os.kill(os.getpid(), signal.SIGSEGV)

    monkeypatch.setattr(h5_probe, "_read", crash)
    assert not h5_probe.reads_without_crashing(_file(tmp_path))


def test_every_dataset_and_attribute_is_read(tmp_path: Path, monkeypatch) -> None:
    original = h5py.Dataset.__getitem__

    def spy(self, key):  # runs in the child; report through a file
        with open(tmp_path / "read.txt", "a") as f:
            f.write(self.name + "\n")
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    assert h5_probe.reads_without_crashing(_file(tmp_path))
    read = (tmp_path / "read.txt").read_text().split()
    assert read == ["/cams/img0"]
    (tmp_path / "read.txt").unlink()
    assert h5_probe.reads_without_crashing(_file(tmp_path), root_only=True)
    assert not (tmp_path / "read.txt").exists()  # no dataset read


def test_opening_an_artifact_whose_root_crashes_hdf5_is_one_error(tmp_path: Path,
                                                                  monkeypatch) -> None:
    from weaktr_cli.artifact_writer import write_artifact
    from weaktr_cli.artifacts import new_meta, open_artifact
    from weaktr_cli.errors import WeakTrError

    meta = new_meta("labels", "toy", "train", ("background", "a"), seed=1, config={})
    out = write_artifact(tmp_path / "a.h5", meta, ["i0"],
                         lambda todo: ((i, np.zeros((2, 3), np.uint8)) for i in todo))
    monkeypatch.setattr(h5_probe, "_read",
                        lambda _path, _root_only: os.kill(os.getpid(), signal.SIGSEGV))
    with pytest.raises(WeakTrError, match="crashed HDF5"):
        open_artifact(out)


def test_a_resume_over_a_partial_that_crashes_hdf5_starts_over(tmp_path: Path,
                                                               monkeypatch) -> None:
    from weaktr_cli.artifact_writer import write_artifact
    from weaktr_cli.artifacts import new_meta, open_artifact

    meta = new_meta("labels", "toy", "train", ("background", "a"), seed=1, config={})
    ids = ["i0", "i1", "i2"]

    def entries(todo):
        for image_id in todo:
            yield image_id, np.full((4, 5), int(image_id[1:]) % 2, np.uint8)

    def stop(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    out = tmp_path / "out.h5"
    with pytest.raises(KeyboardInterrupt):
        write_artifact(out, meta, ids, entries, progress=stop)
    assert (tmp_path / "out.h5.partial").exists()
    computed: list[str] = []

    def counting(todo):
        computed.extend(todo)
        yield from entries(todo)

    monkeypatch.setattr(h5_probe, "_read",
                        lambda _path, _root_only: os.kill(os.getpid(), signal.SIGSEGV))
    write_artifact(out, meta, ids, counting)
    assert computed == ids  # nothing kept from the crashing partial
    monkeypatch.undo()
    with open_artifact(out) as reader:
        assert list(reader.ids) == ids
