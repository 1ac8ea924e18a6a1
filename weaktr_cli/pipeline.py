"""`weaktr pipeline`: every phase in order into a work folder, skipping what is up to date.

Like `make`: each phase records a stamp (`<work>/.stamps/<phase>.json`) with a key made of its
settings and the identity (size, mtime) of its inputs. A phase whose outputs exist and whose key
is unchanged is skipped; `force` redoes named phases (and so everything after them). Each phase
is the ordinary library call behind its subcommand, so a user can stop after any phase, inspect
or replace its artifact, and rerun: a replaced artifact changes the keys downstream.

Scoring follows the paper's protocol: the CAMs and the seeds are scored on the training split
(they are made for it), the retrained model on the training split too (does it correct its
seeds?) and on a held-out test split that no recipe choice ever looked at (shapes has one; for
datasets without, `val`). `metrics.json` in the work folder records every figure with the phase
times, the machine (CPU kind, native bf16 or not), the precisions, the seed and the versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weaktr_cli.errors import WeakTrError
from weaktr_cli.files import atomic_write_text

if TYPE_CHECKING:
    from weaktr_cli.data.base import SegmentationDataset

PHASES = ("train-cam", "dump-cams", "crf", "retrain", "predict", "evaluate", "report")
Log = Callable[[str], None]


@dataclass
class PipelineConfig:
    """What to run: a dataset, a recipe (settings of every phase), a work folder and a seed."""

    work: Path = Path("weaktr-run")
    data: str = "shapes"
    data_root: Path | None = None
    train_split: str = "train"
    val_split: str = "val"
    test_split: str | None = None  # default: "test" for shapes, else the val split
    recipe: str | None = None  # default: the dataset's name
    seed: int | None = None  # default: the recipe's
    pretrained: Path | None = None
    from_scratch: bool = False  # a recipe made for ImageNet weights, on purpose without them
    device: str = "auto"
    workers: int = 2
    force: tuple[str, ...] = ()
    show_images: int = 8
    #: per-phase recipe overrides (field -> value; None keeps the recipe's), e.g.
    #: {"cam": {"batch_size": 4}, "retrain": {"iterations": 200}, "predict": {...}}
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class PhaseRecord:
    name: str
    skipped: bool
    wall_s: float
    outputs: list[Path]
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.outputs if p.is_file())


@dataclass
class PipelineResult:
    work: Path
    phases: list[PhaseRecord]
    metrics: dict[str, Any]  # mIoU per scored artifact; None where there were no pixel labels
    unscored: list[str] = field(default_factory=list)  # "dataset/split" without pixel labels

    @property
    def pictures(self) -> list[Path]:
        return [p for p in (self.work / "panels.png", self.work / "iou.png") if p.is_file()]


def _identity(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path.name), stat.st_size, stat.st_mtime_ns]


class _Runner:
    """Runs phases with stamps; a forced or re-run phase forces everything after it."""

    def __init__(self, work: Path, force: tuple[str, ...], log: Log) -> None:
        self.work = work
        self.stamps = work / ".stamps"
        self.stamps.mkdir(parents=True, exist_ok=True)
        self.force = set(force)
        self.log = log
        self.records: list[PhaseRecord] = []
        self._dirty = False

    def run(self, name: str, outputs: list[Path], settings: dict[str, Any], inputs: list[Path],
            action: Callable[[], dict[str, Any]]) -> PhaseRecord:
        key = hashlib.sha256(json.dumps(
            {"settings": settings, "inputs": [_identity(p) for p in inputs]},
            sort_keys=True, default=str).encode()).hexdigest()
        stamp_path = self.stamps / f"{name}.json"
        stamp = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
        fresh = (stamp.get("key") == key and all(p.exists() for p in outputs)
                 and name not in self.force and not self._dirty)
        if fresh:
            self.log(f"[dim]{name}: up to date, skipped[/]")
            record = PhaseRecord(name, True, float(stamp.get("wall_s", 0.0)), outputs,
                                 stamp.get("result", {}))
        else:
            self._dirty = True
            self.log(f"[bold]{name}[/] ...")
            started = time.perf_counter()
            result = action()
            wall = time.perf_counter() - started
            record = PhaseRecord(name, False, wall, outputs, result)
            atomic_write_text(stamp_path, json.dumps(
                {"key": key, "wall_s": wall, "result": result}, indent=2, default=str))
            self.log(f"{name}: done in {wall:.1f} s")
        self.records.append(record)
        return record


def run_pipeline(config: PipelineConfig, *, log: Log | None = None,
                 progress: Callable[[str], Callable[[int, int], None]] | None = None
                 ) -> PipelineResult:
    """Run (or skip) every phase on `config.data` and return per-phase records and metrics."""
    from weaktr_cli.data import open_dataset
    from weaktr_cli.recipes import RETRAIN_FROM_CAM, check_encoder_init, qualify_recipe, resolve

    say = log or (lambda _m: None)
    bar = progress or (lambda _name: (lambda _done, _total: None))
    unknown = [p for p in config.force if p not in PHASES]
    if unknown:
        raise WeakTrError(f"unknown phase {unknown[0]!r} in --force",
                          hint=f"phases: {', '.join(PHASES)}")
    recipe = qualify_recipe(config.recipe, config.data)
    overrides = config.overrides
    cam_config = resolve("cam", recipe, **{"seed": config.seed, **overrides.get("cam", {})})
    cam_config.check()
    note = check_encoder_init(recipe, config.pretrained, config.from_scratch)
    if note:
        say(note)
    work = config.work
    work.mkdir(parents=True, exist_ok=True)
    runner = _Runner(work, config.force, say)
    train_set = open_dataset(config.data, config.train_split, config.data_root)
    val_set = open_dataset(config.data, config.val_split, config.data_root)
    test_set = _held_out(config, val_set)

    retrain_config = resolve("retrain", recipe,
                             **{"seed": config.seed, **overrides.get("retrain", {})})
    dump_settings, seed_recipe = resolve("dump", recipe), resolve("seeds", recipe)
    predict_settings = resolve("predict", recipe, **overrides.get("predict", {}))
    dataset_key = {"data": config.data, "root": str(config.data_root),
                   "train": train_set.split, "val": val_set.split, "n": len(train_set)}

    cam_ckpt = work / "cam.ckpt"
    cams = work / "cams_train.h5"
    seeds = work / "seeds_train.h5"
    seg_ckpt = work / "seg.ckpt"
    preds_train = work / "preds_train.h5"
    preds_test = work / f"preds_{test_set.split}.h5"
    scores_path = work / "scores.json"

    def train_cam_phase() -> dict[str, Any]:
        from weaktr_cli.train_cam import train_cam

        for stale in (cam_ckpt.with_name(cam_ckpt.name + s) for s in (".jsonl",)):
            stale.unlink(missing_ok=True)
        result = train_cam(train_set, val_set, cam_ckpt, cam_config,
                           pretrained=config.pretrained, device=config.device, log=say,
                           log_jsonl=work / "cam.ckpt.jsonl", progress=bar("train-cam"))
        last = result.history[-1] if result.history else {}
        return {"val_map": last.get("val_map"), "epochs": len(result.history)}

    runner.run("train-cam", [cam_ckpt], {"dataset": dataset_key, "cam": cam_config.to_dict(),
                                        "pretrained": str(config.pretrained)}, [],
               train_cam_phase)

    def dump_phase() -> dict[str, Any]:
        from weaktr_cli.cams import dump_cams
        from weaktr_cli.models.io import load_cam_model

        model, _ = load_cam_model(cam_ckpt)
        dump_cams(model, train_set, cams, settings=dump_settings, device=config.device,
                  resume=False, checkpoint=cam_ckpt, seed=cam_config.seed,
                  progress=bar("dump-cams"))
        return {}

    runner.run("dump-cams", [cams], {"dump": dataclasses.asdict(dump_settings)}, [cam_ckpt],
               dump_phase)

    def crf_phase() -> dict[str, Any]:
        from weaktr_cli.dense_crf import get_preset
        from weaktr_cli.seeds import make_seeds

        make_seeds(cams, train_set, seeds, bg=seed_recipe.bg,
                   params=get_preset(seed_recipe.preset) if seed_recipe.preset else None,
                   unary=seed_recipe.unary, workers=config.workers, resume=False,
                   progress=bar("crf"))
        return {}

    runner.run("crf", [seeds], {"seeds": dataclasses.asdict(seed_recipe)}, [cams], crf_phase)

    # Without ImageNet weights, recipes may start the encoder from the CAM backbone.
    encoder_init = config.pretrained or (cam_ckpt if recipe in RETRAIN_FROM_CAM else None)

    def retrain_phase() -> dict[str, Any]:
        from weaktr_cli.retrain.loop import retrain

        (work / "seg.ckpt.jsonl").unlink(missing_ok=True)
        result = retrain(train_set, seeds, seg_ckpt, retrain_config, pretrained=encoder_init,
                         cams=seed_cams, device=config.device, log=say,
                         log_jsonl=work / "seg.ckpt.jsonl", progress=bar("retrain"))
        return {"steps": result.steps, "tau": result.tau}

    # The CAMs mark the seeds' ambiguous pixels when the recipe ignores them.
    seed_cams = cams if retrain_config.ambiguity is not None else None
    runner.run("retrain", [seg_ckpt], {"retrain": retrain_config.to_dict(),
                                      "encoder_init": str(encoder_init)},
               [seeds] + ([cam_ckpt] if encoder_init == cam_ckpt else [])
               + ([cams] if seed_cams else []), retrain_phase)

    def predict_phase() -> dict[str, Any]:
        from weaktr_cli.models.io import load_segmenter
        from weaktr_cli.predict import predict_split, settings_for_checkpoint

        model, meta = load_segmenter(seg_ckpt)
        settings = settings_for_checkpoint(meta, predict_settings)
        for dataset, out in ((train_set, preds_train), (test_set, preds_test)):
            predict_split(model, dataset, out, settings, class_names=train_set.class_names,
                          device=config.device, resume=False, checkpoint=seg_ckpt,
                          progress=bar(f"predict {dataset.split}"))
        return {}

    runner.run("predict", [preds_train, preds_test],
               {"predict": dataclasses.asdict(predict_settings)}, [seg_ckpt], predict_phase)

    # Pixel masks are optional (a dataset of one's own often has none): what has no masks is
    # not scored, and the panels are drawn all the same.
    unscored = [f"{d.name}/{d.split}" for d in (train_set, test_set) if not d.has_masks]
    if unscored:
        say(f"[yellow]no pixel labels in {' and '.join(unscored)}[/]: nothing to score there; "
            "evaluate skips it and the report draws panels only")

    def evaluate_phase() -> dict[str, Any]:
        from weaktr_cli.artifacts import open_artifact
        from weaktr_cli.evaluation import evaluate_artifact
        from weaktr_cli.metrics import default_thresholds

        scores: dict[str, Any] = {}
        for name, path, dataset in (("cams_train", cams, train_set),
                                    ("seeds_train", seeds, train_set),
                                    ("model_train", preds_train, train_set),
                                    (f"model_{test_set.split}", preds_test, test_set)):
            if not dataset.has_masks:
                scores[name] = {"miou": None, "unscored": "no pixel labels in "
                                f"{dataset.name}/{dataset.split}"}
                continue
            with open_artifact(path) as reader:
                result = evaluate_artifact(reader, dataset, thresholds=default_thresholds())
            scores[name] = result.to_dict()
            scores[name].pop("confusion", None)
        atomic_write_text(scores_path, json.dumps(scores, indent=2))
        figures: dict[str, Any] = {k: v["miou"] for k, v in scores.items()}
        # Plain threshold seeds at the CRF's background level: what the CRF adds.
        figures["threshold_seeds_train"] = _sweep_at(scores["cams_train"], seed_recipe.bg)
        figures["cams_train_threshold"] = scores["cams_train"].get("best_threshold")
        return figures

    evaluated = runner.run("evaluate", [scores_path],
                           {"thresholds": "default", "bg": seed_recipe.bg, "unscored": unscored},
                           [cams, seeds, preds_train, preds_test], evaluate_phase)

    panels, chart = work / "panels.png", work / "iou.png"
    scored = any(evaluated.result.get(k) is not None
                 for k in ("cams_train", "seeds_train", "model_train"))

    def report_phase() -> dict[str, Any]:
        from contextlib import ExitStack

        from weaktr_cli.artifacts import open_artifact
        from weaktr_cli.visualize import Layer, iou_chart, panel_sheet

        with ExitStack() as stack:
            layers = [Layer(title, stack.enter_context(open_artifact(path)))
                      for title, path in (("CAM", cams), ("seeds", seeds),
                                          ("prediction", preds_train))]
            panel_sheet(train_set, train_set.ids[: config.show_images], layers, panels)
        if not scored:
            chart.unlink(missing_ok=True)  # a chart of an earlier, scored run would mislead
            return {}
        scores = json.loads(scores_path.read_text())
        series = {}
        for key, label in (("cams_train", "CAM (train)"), ("seeds_train", "seeds (train)"),
                           ("model_train", "model (train)"),
                           (f"model_{test_set.split}", f"model ({test_set.split})")):
            if scores[key].get("miou") is None:
                continue
            per_class = {row["id"]: row["iou"] for row in scores[key]["per_class"]}
            series[label] = [per_class.get(i) for i in range(train_set.num_classes)]
        iou_chart(series, train_set.class_names, chart,
                  title=f"per-class IoU, {config.data} ({recipe} recipe)")
        return {}

    runner.run("report", [panels, chart] if scored else [panels],
               {"show": config.show_images, "scored": scored}, [scores_path], report_phase)
    figures = dict(evaluated.result)
    write_metrics(work / "metrics.json", config, recipe, runner.records, figures,
                  seeds={"train-cam": cam_config.seed, "retrain": retrain_config.seed},
                  splits={"train": train_set.split, "val": val_set.split,
                                                "test": test_set.split},
                  precisions=_precisions(config.device, cam_config.precision,
                                         retrain_config.precision, predict_settings.precision))
    return PipelineResult(work, runner.records, figures, unscored=unscored)


def _held_out(config: PipelineConfig, val_set: SegmentationDataset) -> SegmentationDataset:
    """The split the model is scored on: --test-split, else shapes' `test`, else val."""
    from weaktr_cli.data import open_dataset

    name = config.test_split or ("test" if config.data == "shapes" else None)
    if name is None or name == val_set.split:
        return val_set
    return open_dataset(config.data, name, config.data_root)


def _sweep_at(cam_scores: dict[str, Any], threshold: float) -> float | None:
    """The CAM sweep's mIoU at `threshold` (None when the sweep does not include it)."""
    for row in cam_scores.get("sweep", []):
        if abs(row["threshold"] - threshold) < 1e-9:
            return float(row["miou"])
    return None


def _precisions(device: str, cam: str, retrain: str, predict: str) -> dict[str, str]:
    """The precision each phase resolves to on this machine ("auto" made concrete)."""
    from weaktr_cli.runtime import resolve_precision, select_device

    dev = select_device(device)
    return {"train-cam": resolve_precision(cam, dev, training=True),
            "retrain": resolve_precision(retrain, dev, training=True),
            "dump-cams": resolve_precision("auto", dev, training=False),
            "predict": resolve_precision(predict, dev, training=False)}


def write_metrics(path: Path, config: PipelineConfig, recipe: str, records: list[PhaseRecord],
                  figures: dict[str, Any], *, seeds: dict[str, int], splits: dict[str, str],
                  precisions: dict[str, str]) -> dict[str, Any]:
    """Write the run's record (the format benchmarks/pipeline_seeds.py gathers) and return it.

    Phase times of skipped phases are those recorded when they last ran, so the record of a
    cached rerun still tells how long the pipeline takes; `skipped` says which ones those are.
    """
    from weaktr_cli.run_record import machine, versions

    record = {
        "format": "weaktr-pipeline-metrics/1",
        "data": config.data, "recipe": recipe, "seed": config.seed, "seeds": seeds,
        "splits": splits,
        "device": config.device, "workers": config.workers,
        "figures": figures,
        "phases": [{"phase": r.name, "skipped": r.skipped, "wall_s": round(r.wall_s, 2),
                    "size_bytes": r.size_bytes} for r in records],
        "total_wall_s": round(sum(r.wall_s for r in records), 2),
        "precision": precisions,
        "machine": machine(),
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_text(path, json.dumps(record, indent=2))
    return record
