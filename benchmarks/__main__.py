"""Run every benchmark, then gather benchmarks/out/*.json into results.json and results.md.

    python -m benchmarks              # all but the long CAM ablation
    python -m benchmarks --all        # the ablation too (about an hour on 2 cores)
    python -m benchmarks --only crf evaluate
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {
    "cli": "benchmarks.bench_cli",
    "evaluate": "benchmarks.bench_evaluate",
    "crf": "benchmarks.bench_crf",
    "dump_cams": "benchmarks.bench_dump_cams",
    "retrain": "benchmarks.bench_retrain",
    "onnx": "benchmarks.bench_onnx",
    "cam_storage": "benchmarks.bench_cam_storage",
}
LONG = {"cam_ablation": "benchmarks.cam_ablation"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--all", action="store_true", help="include the long CAM ablation")
    parser.add_argument("--only", nargs="*", help="names of benchmarks to run")
    args = parser.parse_args()
    chosen = {**SCRIPTS, **(LONG if args.all else {})}
    if args.only:
        unknown = set(args.only) - set(SCRIPTS) - set(LONG)
        if unknown:
            parser.error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
        chosen = {k: v for k, v in {**SCRIPTS, **LONG}.items() if k in args.only}
    status = {}
    for name, module in chosen.items():
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        code = subprocess.run([sys.executable, "-m", module], cwd=HERE.parent).returncode
        status[name] = {"exit_code": code, "wall_s": round(time.perf_counter() - started, 1)}
    gather(status)
    if any(s["exit_code"] for s in status.values()):
        sys.exit(1)


def gather(status: dict[str, dict[str, float]]) -> None:
    previous = HERE / "results.json"
    runs = json.loads(previous.read_text()).get("runs", {}) if previous.exists() else {}
    results = {"runs": {**runs, **status}, "benchmarks": {}}
    lines = ["# weaktr benchmarks", ""]
    for path in sorted((HERE / "out").glob("*.json")):
        data = json.loads(path.read_text())
        results["benchmarks"][path.stem] = data
        lines += [f"## {path.stem}", ""]
        tables = [k for k in ("table", "rows", "runs") if _is_table(data.get(k))]
        for key in tables:  # the ablation's summary table first, then rows, then runs
            lines += _markdown_table(data[key])
        extras = {k: v for k, v in data.items() if k not in (*tables, "benchmark")}
        if extras:
            lines += ["", "```json", json.dumps(extras, indent=1, default=str), "```"]
        lines.append("")
    (HERE / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (HERE / "results.md").write_text("\n".join(lines))
    print(f"-> {HERE / 'results.json'}, {HERE / 'results.md'}")


def _is_table(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(r, dict) for r in value)


def _markdown_table(rows: list[dict[str, object]]) -> list[str]:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return [*lines, ""]


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


if __name__ == "__main__":
    main()
