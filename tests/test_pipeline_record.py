"""`metrics.json` stays the record of the run that made its figures (issue 16).

A rerun of `weaktr pipeline` on a finished work folder skips every phase; it used to rewrite
the record with the rerun's machine block (its load average, its versions), so a figure
measured on an idle machine read as if measured under the rerun's load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from weaktr_cli import run_record
from weaktr_cli.pipeline import PHASES, PipelineConfig, write_metrics
from weaktr_cli.stamps import PhaseRecord

FIGURES = {"cams_train": 77.25, "seeds_train": 80.5, "model_train": 82.625, "model_test": None}


def _records(tmp_path: Path, skipped: set[str]) -> list[PhaseRecord]:
    return [PhaseRecord(name, name in skipped, 10.0 + n, [tmp_path / f"{name}.out"])
            for n, name in enumerate(PHASES)]


def _write(path: Path, records: list[PhaseRecord], figures: dict[str, Any]) -> dict[str, Any]:
    return write_metrics(path, PipelineConfig(work=path.parent, seed=0), "shapes", records,
                         figures, seeds={"train-cam": 0, "retrain": 0},
                         splits={"train": "train", "val": "val", "test": "test"},
                         precisions={"train-cam": "fp32"})


@pytest.fixture
def load(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The machine's load average as `machine()` reports it; a test changes it between runs."""
    current = [0.5, 0.5, 0.5]
    monkeypatch.setattr(run_record, "machine", lambda **_: {
        "cpu": "test CPU", "cores": 2, "native_bf16": False, "load_average": list(current)})
    return current


def test_a_rerun_that_skips_every_phase_leaves_the_record_as_it_was(
        tmp_path: Path, load: list[float]) -> None:
    path = tmp_path / "metrics.json"
    first = _write(path, _records(tmp_path, skipped=set()), FIGURES)
    written = path.read_bytes()
    load[:] = [3.0, 2.5, 2.0]  # the rerun meets a busy machine
    again = _write(path, _records(tmp_path, skipped=set(PHASES)), dict(FIGURES))
    assert path.read_bytes() == written
    assert again == first and again["machine"]["load_average"] == [0.5, 0.5, 0.5]
    assert not any(p["skipped"] for p in again["phases"])


def test_a_rerun_that_ran_a_phase_records_its_own_machine(tmp_path: Path,
                                                          load: list[float]) -> None:
    path = tmp_path / "metrics.json"
    _write(path, _records(tmp_path, skipped=set()), FIGURES)
    load[:] = [3.0, 2.5, 2.0]
    rerun = _write(path, _records(tmp_path, skipped={"train-cam", "dump-cams"}), FIGURES)
    assert json.loads(path.read_text()) == rerun
    assert rerun["machine"]["load_average"] == [3.0, 2.5, 2.0]
    assert [p["skipped"] for p in rerun["phases"][:3]] == [True, True, False]


@pytest.mark.parametrize("earlier", [None, "not json", {"format": "weaktr-pipeline-metrics/1",
                                                         "figures": {"cams_train": 1.0}}])
def test_a_skipped_rerun_without_a_matching_record_writes_one(
        tmp_path: Path, load: list[float], earlier: Any) -> None:
    path = tmp_path / "metrics.json"
    if earlier is not None:
        path.write_text(earlier if isinstance(earlier, str) else json.dumps(earlier))
    record = _write(path, _records(tmp_path, skipped=set(PHASES)), FIGURES)
    assert json.loads(path.read_text()) == record
    assert record["figures"] == FIGURES and all(p["skipped"] for p in record["phases"])
