"""The README's first command on a fresh clone, timed end to end: install, dataset, pipeline.

    python -m benchmarks.first_command [--work DIR] [--no-pip-cache]

Clones this repository (its committed HEAD) into WORK/clone, runs the first line of the
README's first ```bash block there with `bash -c`, with an empty dataset cache (WORK/cache, so
the built-in dataset is generated as on a new machine), and writes the wall time of the
whole command, the pipeline's own phase times (its `metrics.json`) and the rest (virtualenv,
install, dataset generation, start-up) to benchmarks/first_command.{json,md}. `--no-pip-cache`
makes pip download or copy every wheel again (PIP_NO_CACHE_DIR), as on a machine that never
installed them; without it pip's wheel cache may be warm.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def first_command(readme: str) -> str:
    """The first line of the README's first ```bash block."""
    lines = readme.splitlines()
    start = lines.index("```bash")
    return lines[start + 1].strip()


def run(work: Path, no_pip_cache: bool) -> dict[str, Any]:
    clone, cache = work / "clone", work / "cache"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    command = first_command((clone / "README.md").read_text())
    env = {**os.environ, "WEAKTR_CACHE": str(cache)}
    env.pop("VIRTUAL_ENV", None)
    if no_pip_cache:
        env["PIP_NO_CACHE_DIR"] = "1"
    load_before = os.getloadavg()
    started = time.perf_counter()
    done = subprocess.run(["bash", "-c", command], cwd=clone, env=env)
    total = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the first command failed with exit status {done.returncode}")
    metrics = json.loads((clone / "weaktr-run" / "metrics.json").read_text())
    return {
        "command": command, "commit": commit, "pip_cache": not no_pip_cache,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "total_s": round(total, 1), "pipeline_s": metrics["total_wall_s"],
        "install_dataset_startup_s": round(total - metrics["total_wall_s"], 1),
        "phases": {p["phase"]: p["wall_s"] for p in metrics["phases"]},
        "figures": metrics["figures"], "machine": metrics["machine"],
        "precision": metrics["precision"], "load_average_before": list(load_before),
    }


def markdown(record: dict[str, Any]) -> str:
    m = record["machine"]
    rows = "\n".join(f"| {name} | {wall:.1f} |" for name, wall in record["phases"].items())
    return f"""The README's first command on a fresh clone (`benchmarks/first_command.py`).

`{record['command']}` at {record['commit'][:7]}, {record['date']}, pip wheel cache
{'warm' if record['pip_cache'] else 'off (PIP_NO_CACHE_DIR)'}, empty dataset cache.

| part | wall s |
|---|---|
| whole command | {record['total_s']:.1f} ({record['total_s'] / 60:.1f} min) |
| venv, install, dataset generation, start-up | {record['install_dataset_startup_s']:.1f} |
| pipeline | {record['pipeline_s']:.1f} ({record['pipeline_s'] / 60:.1f} min) |
{rows}

Machine: {m['cpu']}, {m['cores']} cores, native bf16: {m['native_bf16']}; torch threads
{m.get('torch_threads')}; load average before the run {record['load_average_before'][0]:.2f};
precision {record['precision']}.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder (default: a new temporary one)")
    parser.add_argument("--no-pip-cache", action="store_true",
                        help="install without pip's wheel cache (PIP_NO_CACHE_DIR=1)")
    parser.add_argument("--out", type=Path, default=HERE / "first_command.json")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="weaktr-first-"))
    record = run(work, args.no_pip_cache)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
