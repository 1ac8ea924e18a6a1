"""Checkpoints and training state on a bad day: pickles, wrong kinds, failed and full writes."""

from __future__ import annotations

import os
import pickle
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import run_cli
from weaktr_cli.checkpoints import (
    load_checkpoint,
    load_training_state,
    save_checkpoint,
    save_training_state,
)
from weaktr_cli.errors import WeakTrError
from weaktr_cli.files import atomic_file

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this runs `touch <marker>`: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _evil(path: Path, marker: Path) -> Path:
    with open(path, "wb") as fh:
        pickle.dump({"model": _Payload(marker)}, fh)
    return path


def test_pickle_passed_as_a_checkpoint_runs_nothing(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    evil = _evil(tmp_path / "cam.pth", marker)
    with pytest.raises(WeakTrError, match="is not a weaktr checkpoint"):
        load_checkpoint(evil)
    result = run_cli(capsys, "dump-cams", "--checkpoint", evil, "--out", tmp_path / "c.h5")
    assert result.code == 1 and "is not a weaktr checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()


def test_pickle_passed_as_training_state_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "cam.ckpt.state"
    torch.save({"step": 1, "payload": _Payload(marker)}, evil)
    with pytest.raises(WeakTrError, match="cannot read training state") as info:
        load_training_state(evil)
    assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)
    assert not marker.exists()


def test_wrong_kind_of_checkpoint_is_named(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "cam.ckpt", {"w": torch.zeros(2)}, {"kind": "cam"})
    with pytest.raises(WeakTrError, match="is a 'cam' checkpoint, but a 'segmenter'") as info:
        load_checkpoint(path, kind="segmenter")
    assert info.value.hint is not None and "retrain writes 'segmenter'" in info.value.hint


def test_artifact_passed_as_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "cams.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200))
    with pytest.raises(WeakTrError, match="is not a weaktr checkpoint"):
        load_checkpoint(path)


def test_failed_checkpoint_write_keeps_the_old_one(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    path = save_checkpoint(tmp_path / "cam.ckpt", {"w": torch.ones(3)}, {"kind": "cam"})
    before = path.read_bytes()

    def half_written(tensors, filename, metadata=None):  # type: ignore[no-untyped-def]
        Path(filename).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(WeakTrError, match="No space left on device") as info:
        save_checkpoint(path, {"w": torch.zeros(3)}, {"kind": "cam"})
    assert info.value.hint is not None and "free disk space" in info.value.hint
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cam.ckpt"]  # no temp file left


def test_atomic_file_under_a_file_size_limit_is_one_line(tmp_path: Path) -> None:
    code = (
        "import sys\nfrom weaktr_cli.files import atomic_write_bytes\n"
        "from weaktr_cli.errors import WeakTrError\n"
        "try:\n    atomic_write_bytes(sys.argv[1], bytes(1 << 20))\n"
        "except WeakTrError as exc:\n    print(exc.message); sys.exit(1)\n"
    )
    target = tmp_path / "state.json"
    target.write_bytes(b"old")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    done = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True,
                          text=True, preexec_fn=limit, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1, done.stderr
    assert done.stdout.strip() == f"cannot write {target}: File too large"
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["state.json"]


def test_training_state_round_trip_is_atomic(tmp_path: Path) -> None:
    path = save_training_state(tmp_path / "s.state", {"step": 7, "t": torch.arange(3)})
    state = load_training_state(path)
    assert state["step"] == 7 and state["t"].tolist() == [0, 1, 2]
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed half-way")
    assert load_training_state(path)["step"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.state"]
