"""benchmarks/pipeline_seeds.py on a tiny dataset: runs, records and mean ± std."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from benchmarks import pipeline_seeds


def test_two_seeds_give_a_summary_of_their_records(tmp_path: Path) -> None:
    from weaktr_cli.data.shapes import ShapesConfig, ensure_shapes

    root = ensure_shapes(ShapesConfig(num_train=16, num_val=4, num_test=4, image_size=32,
                                      seed=5), cache_dir=tmp_path / "data")
    out = tmp_path / "ps"
    pipeline_seeds.main(["--seeds", "0", "1", "--work", str(tmp_path / "runs"), "--out",
                         str(out), "--cli-module", "tests.weaktr_test_cli", "--",
                         "--data-root", str(root), "--recipe", "smoke", "--workers", "1"])
    saved = json.loads(out.with_suffix(".json").read_text())
    runs = [json.loads((tmp_path / "runs" / f"seed-{s}" / "metrics.json").read_text())
            for s in (0, 1)]
    assert saved["runs"] == runs
    summary = saved["summary"]
    assert summary["seeds"] == [0, 1]
    assert [r["seeds"]["retrain"] for r in runs] == [0, 1]  # --seed reached every phase
    for key in ("cams_train", "seeds_train", "model_train", "model_test"):
        values = [r["figures"][key] for r in runs]
        assert summary["figures"][key]["values"] == values
        assert summary["figures"][key]["mean"] == pytest.approx(statistics.fmean(values))
        assert summary["figures"][key]["std"] == pytest.approx(statistics.stdev(values))
    assert summary["phase_wall_s"]["total"]["values"] == [r["total_wall_s"] for r in runs]
    assert set(summary["phase_wall_s"]) >= {"train-cam", "dump-cams", "crf", "retrain"}
    table = out.with_suffix(".md").read_text()
    assert "| model, test |" in table and "cores" in table

    # --gather-only runs nothing (a module that does not exist would fail) and gives the same.
    again = tmp_path / "again"
    pipeline_seeds.main(["--seeds", "0", "1", "--work", str(tmp_path / "runs"), "--out",
                         str(again), "--cli-module", "no_such_module", "--gather-only"])
    assert json.loads(again.with_suffix(".json").read_text()) == saved
    with pytest.raises(SystemExit, match=r"seed-2.*no record"):
        pipeline_seeds.main(["--seeds", "2", "--work", str(tmp_path / "runs"), "--out",
                             str(again), "--gather-only"])
