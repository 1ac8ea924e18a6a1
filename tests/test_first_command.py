"""benchmarks/first_command.py: which command it times and how it reports it."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.first_command import first_command, markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_it_times_the_readmes_install_and_pipeline_line() -> None:
    command = first_command(README.read_text())
    assert "pip install" in command and command.endswith("weaktr pipeline")


def test_a_readme_without_a_bash_block_is_refused() -> None:
    with pytest.raises(ValueError):
        first_command("# title\n\nno commands here\n")


def test_markdown_reports_every_part() -> None:
    record = {
        "command": "make it", "commit": "0123456789", "pip_cache": False,
        "date": "2026-12-02 10:00 UTC", "total_s": 516.4, "pipeline_s": 407.1,
        "install_dataset_startup_s": 109.3, "phases": {"train-cam": 74.8, "retrain": 201.7},
        "machine": {"cpu": "AMD EPYC", "cores": 2, "native_bf16": False, "torch_threads": 2},
        "precision": {"retrain": "fp32"}, "load_average_before": [0.5, 0.6, 0.7],
    }
    text = markdown(record)
    assert "| whole command | 516.4 (8.6 min) |" in text
    assert "| pipeline | 407.1 (6.8 min) |" in text and "| retrain | 201.7 |" in text
    assert "0123456" in text and "off (PIP_NO_CACHE_DIR)" in text and "native bf16: False" in text
