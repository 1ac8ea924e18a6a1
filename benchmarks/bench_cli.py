"""CLI start-up: wall time of `weaktr --help` / `--version` / a subcommand's help (median of 15).

Shell completion and every command pay this before any work, so heavy imports (torch, timm,
h5py) stay inside command bodies. Target: under 0.3 s. Run: python -m benchmarks.bench_cli
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from benchmarks.common import report

RUNS = 15


def wall(args: list[str]) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "weaktr_cli", *args], check=True,
                       stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    baseline = wall_python()
    rows = [{"command": "python -c pass", "median_s": baseline}]
    for args in (["--version"], ["--help"], ["evaluate", "--help"], ["train-cam", "--help"]):
        rows.append({"command": "weaktr " + " ".join(args), "median_s": wall(args)})
    report("cli_startup", rows, {"target_s": 0.3, "runs": RUNS})


def wall_python() -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    main()
