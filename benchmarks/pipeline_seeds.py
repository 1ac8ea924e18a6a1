"""`weaktr pipeline` over several run seeds: every figure as mean ± std, with phase times.

    python -m benchmarks.pipeline_seeds --seeds 0 1 2 [--work runs/seeds] [-- PIPELINE ARGS]

Each seed runs `weaktr pipeline --seed S --work WORK/seed-S` in its own process, one after the
other (a finished seed is skipped by the pipeline's own stamps, so an interrupted study
resumes). The `metrics.json` of every run is the record: this script only gathers them into
benchmarks/pipeline_seeds.json (every run's record plus the summary) and pipeline_seeds.md (a
table for the README), so each figure quoted from it names its seeds, phase times and CPU.
Arguments after `--` go to every pipeline run (e.g. `--data-root DIR --recipe smoke`).
`--gather-only` runs nothing: it gathers the `metrics.json` the seeds' folders already hold
(seeds run at different times, or from another checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: The figures the summary reports, in table order (metrics.json "figures" keys).
FIGURES = (
    ("cams_train", "CAM, train (best threshold)"),
    ("threshold_seeds_train", "threshold seeds, train (seeds' background)"),
    ("seeds_train", "CRF seeds, train"),
    ("model_train", "model, train"),
    ("model_test", "model, test"),
    ("model_val", "model, val"),
)


def run_seed(seed: int, work: Path, extra: list[str], cli_module: str = "weaktr_cli",
             *, gather_only: bool = False) -> dict[str, Any]:
    """Run one pipeline (or find it up to date) and return its metrics.json record."""
    if gather_only:
        if not (work / "metrics.json").is_file():
            raise SystemExit(f"{work / 'metrics.json'}: no record to gather (run the seed first)")
        return dict(json.loads((work / "metrics.json").read_text()))
    command = [sys.executable, "-m", cli_module, "pipeline", "--seed", str(seed),
               "--work", str(work), "--quiet", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    print(f"== seed {seed}: {' '.join(command[2:])}", flush=True)
    subprocess.run(command, check=True, env=env)
    record: dict[str, Any] = json.loads((work / "metrics.json").read_text())
    return record


def _mean_std(values: list[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None}


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std over runs of every figure and of each phase's wall time."""
    figures = {}
    for key, _ in FIGURES:
        values = [r["figures"][key] for r in records if r["figures"].get(key) is not None]
        if values:
            figures[key] = {**_mean_std(values), "values": values}
    phases: dict[str, list[float]] = {}
    for record in records:
        for phase in record["phases"]:
            phases.setdefault(phase["phase"], []).append(phase["wall_s"])
    phases["total"] = [r["total_wall_s"] for r in records]
    machines = {json.dumps({k: r["machine"].get(k) for k in ("cpu", "cores", "native_bf16")},
                           sort_keys=True) for r in records}
    return {"seeds": [r["seed"] for r in records], "figures": figures,
            "phase_wall_s": {name: {**_mean_std(v), "values": v} for name, v in phases.items()},
            "machines": [json.loads(m) for m in sorted(machines)],
            "precision": records[0]["precision"], "versions": records[0]["versions"]}


def markdown(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table (figures, then phase times)."""
    def cell(stat: dict[str, Any], digits: int) -> str:
        std = "" if stat["std"] is None else f" ± {stat['std']:.{digits}f}"
        return f"{stat['mean']:.{digits}f}{std}"

    lines = [f"Pipeline over seeds {', '.join(map(str, summary['seeds']))} "
             "(mean ± sample std).", "", "| figure (mIoU) | mean ± std | per seed |",
             "|---|---|---|"]
    labels = dict(FIGURES)
    for key, stat in summary["figures"].items():
        per_seed = ", ".join(f"{v:.1f}" for v in stat["values"])
        lines.append(f"| {labels[key]} | {cell(stat, 1)} | {per_seed} |")
    lines += ["", "| phase | wall s, mean ± std |", "|---|---|"]
    lines += [f"| {name} | {cell(stat, 1)} |" for name, stat in summary["phase_wall_s"].items()]
    for machine in summary["machines"]:
        bf16 = "native bf16" if machine.get("native_bf16") else "no native bf16"
        lines.append(f"\nMeasured on {machine['cpu']}, {machine['cores']} cores, {bf16}; "
                     f"precision {summary['precision']}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=Path("runs/pipeline_seeds"))
    parser.add_argument("--out", type=Path, default=HERE / "pipeline_seeds",
                        help="writes OUT.json and OUT.md")
    parser.add_argument("--cli-module", default="weaktr_cli",
                        help="module run as `python -m MODULE pipeline ...` (the tests pass "
                             "one that registers their tiny recipe)")
    parser.add_argument("--gather-only", action="store_true",
                        help="run nothing; gather the seeds' existing metrics.json")
    args = parser.parse_args(own)
    records = [run_seed(seed, args.work / f"seed-{seed}", extra, args.cli_module,
                        gather_only=args.gather_only) for seed in args.seeds]
    summary = summarise(records)
    args.out.with_suffix(".json").write_text(
        json.dumps({"summary": summary, "runs": records}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(summary))
    print(markdown(summary))
    print(f"-> {args.out.with_suffix('.json')}, {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
