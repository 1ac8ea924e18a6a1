"""Each phase before and after, on the same machine in one run, against plain baselines.

    python -m benchmarks.speed_before_after --old /tmp/old --checkpoint CAM.ckpt
        [--images 500] [--repeats 3]

`--old` is a checkout of the earlier code (`git worktree add /tmp/old <commit>`). Every
measurement is a whole `weaktr` process as a user starts it (start-up included), on the first
N images of the built-in dataset's train split, with the old and the new code run alternately
(round-robin, `--repeats` rounds) and reported as medians, so both meet the same machine load.
Plain baselines run in the same rounds: a pydensecrf loop over the same CAMs with the same
parameters (one process, its own imports included; it keeps its label maps in memory, writes
nothing, and after the rounds one untimed run checks they equal weaktr's seeds) and a numpy
bincount loop over the same label files. Both checkouts are byte-compiled first, as
`pip install` does: with $PYTHONDONTWRITEBYTECODE set, every weaktr process would otherwise
compile its modules again while the plain loops' libraries load cached bytecode. 500 images
by default: every process starts in about half a second, which 96 images (the first records)
weighed like 20 images of CRF; a user's split has thousands.

Fixtures are made by the old code (its artifacts are schema 1, which both versions read): the
old dump-cams output feeds both crf runs, a briefly retrained model feeds predict and its ONNX
export predict --onnx. evaluate is timed in process on every train image (its start-up is
the CLI's), like the numpy loop. Writes the record benchmarks/speed_before_after.json and a
table, benchmarks/speed_before_after.md; the machine's CPU kind and load averages are recorded
with it (`--name` names another record). `--table-only` rewrites the table from the record.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NEW = HERE.parent
PYTHON = sys.executable

PLAIN_CRF = r'''
import sys, time, h5py, numpy as np
from PIL import Image
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels
cams, root, ids = sys.argv[1], sys.argv[2], open(sys.argv[3]).read().split()
out = {}
with h5py.File(cams, "r") as f:
    for i in ids:
        ds = f["cams"][i]
        maps, cls = ds[()].astype(np.float32), ds.attrs["class_ids"].astype(np.int64)
        order = np.argsort(cls)
        planes = np.concatenate([np.full((1,) + maps.shape[1:], 0.43, np.float32), maps[order]])
        label = planes.argmax(0)
        img = np.array(Image.open(f"{root}/JPEGImages/{i}.png").convert("RGB"), order="C")
        h, w = label.shape
        d = dcrf.DenseCRF2D(w, h, planes.shape[0])
        d.setUnaryEnergy(unary_from_labels(label, planes.shape[0], gt_prob=0.7, zero_unsure=False))
        d.addPairwiseGaussian(sxy=4, compat=3)
        d.addPairwiseBilateral(sxy=83, srgb=5, rgbim=img, compat=3)
        q = np.array(d.inference(10)).reshape(planes.shape[0], h, w)
        out[i] = np.concatenate([[0], cls[order]])[q.argmax(0)].astype(np.uint8)
if len(sys.argv) > 4:  # the untimed check run: keep the label maps
    np.savez_compressed(sys.argv[4], **out)
'''

EVALUATE = r'''
import sys, time, json
import numpy as np
from weaktr_cli.artifacts import open_artifact
from weaktr_cli.data import open_dataset
labels, root = sys.argv[1], sys.argv[2]
dataset = open_dataset("shapes", "train", root)
start = time.perf_counter()
if sys.argv[3] == "weaktr":
    from weaktr_cli.evaluation import evaluate_artifact
    with open_artifact(labels) as reader:
        miou = evaluate_artifact(reader, dataset).scores.miou
        n = len(reader)
else:
    import h5py
    from PIL import Image
    k = dataset.num_classes
    matrix = np.zeros((k, k), np.int64)
    with h5py.File(labels, "r") as f:
        group = f["labels"]
        for i in group:
            pred = group[i][()]
            gt = np.array(Image.open(f"{root}/SegmentationClass/{i}.png"))
            valid = gt != 255
            matrix += np.bincount(gt[valid].astype(np.int64) * k + pred[valid],
                                  minlength=k * k).reshape(k, k)
        n = len(group)
    tp = np.diag(matrix); miou = float(np.nanmean(tp / (matrix.sum(0) + matrix.sum(1) - tp)))
print(json.dumps({"images_per_s": n / (time.perf_counter() - start), "miou": miou}))
'''


#: CPU seconds (user + system) of the last child process run: unlike wall time it hardly
#: depends on what else the machine runs.
_LAST_CPU: list[float] = [0.0]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _env(code: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(code), "PYTHONHASHSEED": "0"}


def _weaktr(code: Path, *args: object) -> float:
    """Wall seconds of one `weaktr` process run from checkout `code`."""
    start, cpu = time.perf_counter(), _children_cpu()
    subprocess.run([PYTHON, "-m", "weaktr_cli", *map(str, args), "-q"], env=_env(code),
                   check=True, stdout=subprocess.DEVNULL, cwd=code)
    _LAST_CPU[0] = _children_cpu() - cpu
    return time.perf_counter() - start


def _python(code: Path | None, script: str, *args: object) -> tuple[float, str]:
    start, cpu = time.perf_counter(), _children_cpu()
    env = _env(code) if code else {**os.environ}
    result = subprocess.run([PYTHON, "-c", script, *map(str, args)], env=env, check=True,
                            capture_output=True, text=True)
    _LAST_CPU[0] = _children_cpu() - cpu
    return time.perf_counter() - start, result.stdout


def fixtures(old: Path, work: Path, root: Path, n: int, checkpoint: Path) -> dict[str, Path]:
    """Artifacts every measured command reads, made once by the old code."""
    work.mkdir(parents=True, exist_ok=True)
    ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    split = work / "subset.txt"
    split.write_text("".join(f"{i}\n" for i in ids[:n]))
    paths = {"split": split, "cams": work / "cams_old.h5", "seeds": work / "seeds_old.h5",
             "seg": work / "seg.ckpt", "onnx": work / "model.onnx",
             "labels": work / "labels_train.h5"}
    data = ["--data", "shapes", "--data-root", root]
    if not paths["cams"].exists():
        _weaktr(old, "dump-cams", "--checkpoint", checkpoint, *data, "--split", split,
                "--out", paths["cams"])
    if not paths["seeds"].exists():
        _weaktr(old, "crf", "--cams", paths["cams"], "--data-root", root, "--out",
                paths["seeds"])
    if not paths["seg"].exists():
        _weaktr(old, "retrain", "--seeds", paths["seeds"], "--data-root", root, "--recipe",
                "shapes", "--iterations", "4", "--out", paths["seg"])
    if not paths["onnx"].exists():
        _weaktr(old, "export-onnx", "--checkpoint", paths["seg"], "--out", paths["onnx"],
                "--dynamic")
    if not paths["labels"].exists():  # every train image: its mask with a wrong band
        _python(old, LABELS, root, paths["labels"])
    return paths


LABELS = r'''
import sys, numpy as np
from weaktr_cli.artifacts import ArtifactWriter, new_meta
from weaktr_cli.data import open_dataset
dataset = open_dataset("shapes", "train", sys.argv[1])
meta = new_meta("labels", "shapes", "train", dataset.class_names)
with ArtifactWriter(sys.argv[2], meta) as writer:
    for i in dataset.ids:
        label = dataset.load_mask(i).copy()
        label[label == 255] = 0
        label[40:48] = 1
        writer.write_labels(i, label)
    writer.finalize()
'''


def measurements(old: Path, paths: dict[str, Path], root: Path, work: Path, n: int
                 ) -> dict[str, dict[str, Any]]:
    """name -> (images, {variant: callable returning seconds or images/s})."""
    data = ["--data", "shapes", "--data-root", root, "--split", paths["split"]]

    def fresh(name: str) -> Path:
        out = work / name
        out.unlink(missing_ok=True)
        return out

    def evaluate(code: Path | None, kind: str) -> float:
        _, out = _python(code, EVALUATE, paths["labels"], root, kind)
        return float(json.loads(out.strip().splitlines()[-1])["images_per_s"])

    cases: dict[str, dict[str, Any]] = {
        "dump-cams": {"images": n, "runs": {
            code_name: (lambda c=code: _weaktr(c, "dump-cams", "--checkpoint", paths["ckpt"],
                                               *data, "--out", fresh("cams.h5")))
            for code_name, code in (("old", old), ("new", NEW))}},
        "crf --workers 1": {"images": n, "runs": {
            **{code_name: (lambda c=code: _weaktr(c, "crf", "--cams", paths["cams"],
                                                  "--data-root", root, "--workers", 1,
                                                  "--out", fresh("seeds.h5")))
               for code_name, code in (("old", old), ("new", NEW))},
            "plain pydensecrf loop": lambda: _python(None, PLAIN_CRF, paths["cams"], root,
                                                     paths["split"])[0]}},
        "crf --workers 2": {"images": n, "runs": {
            code_name: (lambda c=code: _weaktr(c, "crf", "--cams", paths["cams"], "--data-root",
                                               root, "--workers", 2, "--out", fresh("seeds.h5")))
            for code_name, code in (("old", old), ("new", NEW))}},
        "predict": {"images": n, "runs": {
            code_name: (lambda c=code: _weaktr(c, "predict", "--checkpoint", paths["seg"], *data,
                                               "--out", fresh("preds.h5")))
            for code_name, code in (("old", old), ("new", NEW))}},
        "predict --onnx": {"images": n, "runs": {
            code_name: (lambda c=code: _weaktr(c, "predict", "--onnx", paths["onnx"], *data,
                                               "--out", fresh("preds_onnx.h5")))
            for code_name, code in (("old", old), ("new", NEW))}},
        "evaluate (in process, images/s)": {"images": None, "runs": {
            "old": lambda: evaluate(old, "weaktr"), "new": lambda: evaluate(NEW, "weaktr"),
            "plain numpy bincount loop": lambda: evaluate(None, "plain")}},
    }
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a shapes cam.ckpt")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/weaktr-speed"))
    parser.add_argument("--only", nargs="*", help="names of the cases to run")
    parser.add_argument("--name", default="speed_before_after",
                        help="record name: writes benchmarks/NAME.json and NAME.md")
    parser.add_argument("--table-only", action="store_true", help="rewrite the .md only")
    parser.add_argument("--from-log", type=Path,
                        help="build the record from the printed rounds of an unfinished run")
    args = parser.parse_args()
    record_path = HERE / f"{args.name}.json"
    if args.table_only:
        _write_table(json.loads(record_path.read_text()))
        return
    sys.path.insert(0, str(NEW))
    from weaktr_cli.data.shapes import ShapesConfig, ensure_shapes
    from weaktr_cli.run_record import machine, versions

    root = ensure_shapes(ShapesConfig())
    for code in (args.old.resolve(), NEW):
        subprocess.run([PYTHON, "-m", "compileall", "-q", str(code / "weaktr_cli")], check=True)
    paths = fixtures(args.old.resolve(), args.work, root, args.images, args.checkpoint)
    paths["ckpt"] = args.checkpoint
    cases = measurements(args.old.resolve(), paths, root, args.work, args.images)
    if args.only:
        cases = {k: v for k, v in cases.items() if k in args.only}
    load_before = os.getloadavg()
    samples: dict[str, dict[str, list[float]]] = {k: {} for k in cases}
    cpu_samples: dict[tuple[str, str], list[float]] = {}
    round_loads: list[list[float]] = []  # load averages after each round
    if args.from_log:
        args.repeats = _read_log(args.from_log, samples)
    for round_index in range(0 if args.from_log else args.repeats):
        for name, case in cases.items():
            for variant, run in case["runs"].items():
                value = run()
                samples[name].setdefault(variant, []).append(value)
                cpu_samples.setdefault((name, variant), []).append(_LAST_CPU[0])
                print(f"round {round_index + 1} {name} {variant}: {value:.2f} "
                      f"(cpu {_LAST_CPU[0]:.2f} s)", flush=True)
        round_loads.append([round(x, 2) for x in os.getloadavg()])
    rows = []
    for name, case in cases.items():
        for variant, values in samples.get(name, {}).items():
            median = statistics.median(values)
            per_s = median if case["images"] is None else case["images"] / median
            cpu = cpu_samples.get((name, variant))
            rows.append({"phase": name, "code": variant,
                         "wall_s": None if case["images"] is None else round(median, 2),
                         "cpu_s": round(statistics.median(cpu), 2) if cpu else None,
                         "images_per_s": round(per_s, 1), "runs": [round(v, 2) for v in values]})
    record = {
        "benchmark": args.name, "images": args.images, "repeats": args.repeats,
        "old": str(args.old), "old_commit": _commit(args.old), "new_commit": _commit(NEW),
        "rows": rows, "machine": machine(), "versions": versions(),
        "plain_crf_equals_weaktr_seeds": _plain_crf_matches(paths, root, args.work),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "load_average_after_each_round": round_loads}
    if args.from_log:
        record["from_log"] = f"{args.from_log}: the complete rounds of an unfinished run; the "
        record["from_log"] += "load averages are those when the record was written"
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(_write_table(record))
    print(f"-> {record_path}")


def _plain_crf_matches(paths: dict[str, Path], root: Path, work: Path) -> bool:
    """Whether the plain loop's label maps equal the new code's seeds of the same CAMs."""
    import numpy as np

    sys.path.insert(0, str(NEW))
    from weaktr_cli.artifacts import open_artifact

    seeds = work / "seeds_check.h5"
    seeds.unlink(missing_ok=True)
    _weaktr(NEW, "crf", "--cams", paths["cams"], "--data-root", root, "--out", seeds)
    _python(None, PLAIN_CRF, paths["cams"], root, paths["split"], work / "plain_crf.npz")
    with np.load(work / "plain_crf.npz") as plain, open_artifact(seeds) as reader:
        return sorted(plain.files) == sorted(reader.ids) and all(
            np.array_equal(plain[i], reader.read_labels(i)) for i in reader.ids)


def _read_log(path: Path, samples: dict[str, dict[str, list[float]]]) -> int:
    """Fill `samples` from "round R NAME VARIANT: VALUE" lines of complete rounds only."""
    rounds: dict[int, list[tuple[str, str, float]]] = {}
    for line in path.read_text().splitlines():
        if not line.startswith("round ") or ": " not in line:
            continue
        head, value = line.split(" (cpu")[0].rsplit(": ", 1)
        number, rest = head[len("round "):].split(" ", 1)
        for name in sorted(samples, key=len, reverse=True):  # "predict --onnx" first
            if rest.startswith(name + " "):
                rounds.setdefault(int(number), []).append(
                    (name, rest[len(name) + 1:], float(value)))
                break
    expected = max(len(r) for r in rounds.values())
    complete = [r for r in rounds.values() if len(r) == expected]
    for entries in complete:
        for name, variant, value in entries:
            samples[name].setdefault(variant, []).append(value)
    return len(complete)


def _commit(path: Path) -> str:
    result = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False)
    return result.stdout.strip()


def _load_note(record: dict[str, Any]) -> str:
    """Whether other work competed for the cores (the run itself keeps about one busy)."""
    busy = max(record["load_average_before"][0], record["load_average_after"][0])
    return ("other jobs shared the machine" if busy > record["machine"]["cores"]
            else "no other heavy job on the machine")


#: Issue 16's bars: (phase, code, baseline code, at least this many times the baseline's rate).
BARS = (("crf --workers 1", "new", "crf --workers 1", "plain pydensecrf loop", 1.0),
        ("crf --workers 2", "new", "crf --workers 1", "plain pydensecrf loop", 1.8),
        ("evaluate (in process, images/s)", "new", "evaluate (in process, images/s)",
         "plain numpy bincount loop", 1.0))


def _bars(record: dict[str, Any]) -> list[str]:
    """Lines comparing the new code with the plain loops (issue 16's bars) and the notes."""
    rate = {(r["phase"], r["code"]): r["images_per_s"] for r in record["rows"]}
    runs = {(r["phase"], r["code"]): r["runs"] for r in record["rows"]}
    lines = ["", "| bar | new / plain loop (medians) | each round | needed |",
             "|---|---|---|---|"]
    for phase, code, base_phase, base, needed in BARS:
        if (phase, code) in rate and (base_phase, base) in rate:
            ratio = rate[phase, code] / rate[base_phase, base]
            # walls (s) give plain / new, rates (images/s) new / plain
            per_round = [b / a if phase.startswith("crf") else a / b
                         for a, b in zip(runs[phase, code], runs[base_phase, base], strict=False)]
            rounds = ", ".join(f"{x:.2f}" for x in per_round)
            lines.append(f"| {phase} vs {base} | {ratio:.2f}x | {rounds} | >= {needed}x |")
    loads = record.get("load_average_after_each_round")
    if loads:
        lines += ["", "Load average (1, 5, 15 min) after each round: "
                  + "; ".join(", ".join(f"{x:.2f}" for x in load) for load in loads) + "."]
    same = record.get("plain_crf_equals_weaktr_seeds")
    if same is not None:
        lines += ["", "The plain pydensecrf loop's label maps "
                  + ("equal" if same else "DIFFER FROM")
                  + " the seeds `weaktr crf` makes of the same CAMs (checked after the rounds)."]
    lines += ["", "Both checkouts are byte-compiled before the rounds, as `pip install` does. "
              "The crf rows read the old code's CAM file; the plain loop runs in one process "
              "with its own imports and writes nothing. `crf --workers 1` of the new code "
              "computes in one forked worker while its parent writes the artifact (CPU s "
              "counts both). Records before 2026-12-02 06:00 UTC used 96 images, where each "
              "process's start-up weighed like 20 images of CRF."]
    return lines


def _write_table(record: dict[str, Any]) -> str:
    """The record as Markdown (benchmarks/speed_before_after.md); returns the text."""
    m = record["machine"]
    bf16 = "native bf16" if m.get("native_bf16") else "no native bf16"
    lines = [f"# Before ({record['old_commit']}) and after ({record['new_commit']}), one run",
             "", f"{m['cpu']}, {m['cores']} cores, {bf16}; load average "
             f"{record['load_average_before']} before, {record['load_average_after']} after "
             f"({_load_note(record)}). {record['images']} shapes train images, whole "
             f"processes, medians of {record['repeats']} interleaved rounds.", "",
             "| phase | code | wall s | CPU s | images/s | runs |", "|---|---|---|---|---|---|"]
    for row in record["rows"]:
        wall = "" if row["wall_s"] is None else f"{row['wall_s']:.2f}"
        cpu = "" if row.get("cpu_s") is None else f"{row['cpu_s']:.2f}"
        lines.append(f"| {row['phase']} | {row['code']} | {wall} | {cpu} | "
                     f"{row['images_per_s']:.1f} | {', '.join(map(str, row['runs']))} |")
    lines += _bars(record)
    text = "\n".join(lines) + "\n"
    (HERE / f"{record['benchmark']}.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
