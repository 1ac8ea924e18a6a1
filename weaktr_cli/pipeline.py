"""`weaktr pipeline`: every phase in order into a work folder, skipping what is up to date.

Like `make` (`weaktr_cli.stamps`): each phase records a stamp (`<work>/.stamps/<phase>.json`)
with a key made of its settings and the identity (size, mtime) of its inputs. A phase whose
outputs exist and whose key is unchanged is skipped; `force` redoes named phases (and so
everything after them). Each phase is the ordinary library call behind its subcommand, so a user
can stop after any phase, inspect or replace its artifact, and rerun: a replaced artifact
changes the keys downstream.

Scoring follows the paper's protocol: the CAMs and the seeds are scored on the training split
(they are made for it), the retrained model on the training split too (does it correct its
seeds?) and on a held-out test split that no recipe choice ever looked at (shapes has one; for
datasets without, `val`). `metrics.json` in the work folder records every figure with the phase
times, the machine (CPU kind, native bf16 or not), the precisions, the seed and the versions.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weaktr_cli.errors import WeakTrError
from weaktr_cli.files import atomic_write_text
from weaktr_cli.stamps import PhaseRecord, StampedRunner

if TYPE_CHECKING:
    from weaktr_cli.data.base import SegmentationDataset

PHASES = ("train-cam", "dump-cams", "crf", "retrain", "predict", "evaluate", "report")
#: The "format" of the work folder's metrics.json.
METRICS_FORMAT = "weaktr-pipeline-metrics/1"
Log = Callable[[str], None]
Update = Callable[..., None]
Bar = Callable[[str, "int | None"], AbstractContextManager[Update]]


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


def phase_overrides(*, cam_arch: str | None = None, cam_batch_size: int | None = None,
                    cam_epochs: int | None = None, cam_input_size: int | None = None,
                    seg_arch: str | None = None, seg_batch_size: int | None = None,
                    seg_steps: int | None = None, seg_crop_size: int | None = None,
                    precision: str | None = None, predict_size: int | None = None,
                    ) -> dict[str, dict[str, Any]]:
    """`PipelineConfig.overrides` from the pipeline's override options (None: the recipe's).

    `precision` sets all three phases; `seg_steps` is retraining's `iterations` and
    `predict_size` prediction's `base_size`.
    """
    phases: dict[str, dict[str, Any]] = {
        "cam": {"arch": cam_arch, "batch_size": cam_batch_size, "epochs": cam_epochs,
                "input_size": cam_input_size, "precision": precision},
        "retrain": {"arch": seg_arch, "batch_size": seg_batch_size, "iterations": seg_steps,
                    "crop_size": seg_crop_size, "precision": precision},
        "predict": {"precision": precision, "base_size": predict_size}}
    return {phase: {k: v for k, v in values.items() if v is not None}
            for phase, values in phases.items()}


@dataclass
class PipelineResult:
    work: Path
    phases: list[PhaseRecord]
    metrics: dict[str, Any]  # mIoU per scored artifact; None where there were no pixel labels
    unscored: list[str] = field(default_factory=list)  # "dataset/split" without pixel labels

    @property
    def pictures(self) -> list[Path]:
        return [p for p in (self.work / "panels.png", self.work / "iou.png") if p.is_file()]


def run_pipeline(config: PipelineConfig, *, log: Log | None = None, bar: Bar | None = None
                 ) -> PipelineResult:
    """Run (or skip) every phase on `config.data` and return per-phase records and metrics.

    `bar(description, total)` is a context manager yielding `update(done, total)` (the CLI's
    progress bar); each phase's bar stays open until the whole run ends.
    """
    unknown = [p for p in config.force if p not in PHASES]
    if unknown:
        raise WeakTrError(f"unknown phase {unknown[0]!r} in --force",
                          hint=f"phases: {', '.join(PHASES)}")
    with ExitStack() as bars:
        def progress(name: str) -> Update:
            return bars.enter_context((bar or _no_bar)(name, None))

        run = _PipelineRun(config, log or (lambda _m: None), progress)
        run.train_cam()
        run.dump_cams()
        run.crf()
        run.retrain()
        run.predict()
        figures = run.evaluate()
        run.report(figures)
        run.write_metrics(figures)
    return PipelineResult(run.work, run.runner.records, figures, unscored=run.unscored)


@contextmanager
def _no_bar(_description: str, _total: int | None = None) -> Iterator[Update]:
    yield lambda *_args, **_kwargs: None


class _PipelineRun:
    """One run's settings, datasets and artifact paths, and one method per phase.

    Everything is resolved up front (an unknown recipe or a bad override fails before any phase
    runs); each phase method hands its settings, inputs and action to the stamping runner.
    """

    def __init__(self, config: PipelineConfig, say: Log,
                 progress: Callable[[str], Update]) -> None:
        from weaktr_cli.data import open_dataset
        from weaktr_cli.recipes import check_encoder_init, qualify_recipe, resolve

        self.config, self.say, self.progress = config, say, progress
        self.recipe = recipe = qualify_recipe(config.recipe, config.data)
        overrides = config.overrides
        self.cam_config = resolve("cam", recipe,
                                  **{"seed": config.seed, **overrides.get("cam", {})})
        self.cam_config.check()
        note = check_encoder_init(recipe, config.pretrained, config.from_scratch)
        if note:
            say(note)
        self.work = work = config.work
        work.mkdir(parents=True, exist_ok=True)
        self.runner = StampedRunner(work, config.force, say)
        self.train_set = open_dataset(config.data, config.train_split, config.data_root)
        self.val_set = open_dataset(config.data, config.val_split, config.data_root)
        self.test_set = _held_out(config, self.val_set)
        self.retrain_config = resolve("retrain", recipe,
                                      **{"seed": config.seed, **overrides.get("retrain", {})})
        self.dump_settings, self.seed_recipe = resolve("dump", recipe), resolve("seeds", recipe)
        self.predict_settings = resolve("predict", recipe, **overrides.get("predict", {}))
        self.unscored: list[str] = []

        self.cam_ckpt = work / "cam.ckpt"
        self.cams = work / "cams_train.h5"
        self.seeds = work / "seeds_train.h5"
        self.seg_ckpt = work / "seg.ckpt"
        self.preds_train = work / "preds_train.h5"
        self.preds_test = work / f"preds_{self.test_set.split}.h5"
        self.scores_path = work / "scores.json"
        self.panels, self.chart = work / "panels.png", work / "iou.png"

    def train_cam(self) -> None:
        config, train_set = self.config, self.train_set
        dataset_key = {"data": config.data, "root": str(config.data_root),
                       "train": train_set.split, "val": self.val_set.split, "n": len(train_set)}

        def action() -> dict[str, Any]:
            from weaktr_cli.train_cam import train_cam
            from weaktr_cli.training import TrainingOptions

            (self.work / "cam.ckpt.jsonl").unlink(missing_ok=True)
            options = TrainingOptions(config.device, log=self.say,
                                      log_jsonl=self.work / "cam.ckpt.jsonl",
                                      progress=self.progress("train-cam"))
            result = train_cam(train_set, self.val_set, self.cam_ckpt, self.cam_config,
                               pretrained=config.pretrained, options=options)
            last = result.history[-1] if result.history else {}
            return {"val_map": last.get("val_map"), "epochs": len(result.history)}

        self.runner.run("train-cam", [self.cam_ckpt],
                        {"dataset": dataset_key, "cam": self.cam_config.to_dict(),
                         "pretrained": str(config.pretrained)}, [], action)

    def dump_cams(self) -> None:
        def action() -> dict[str, Any]:
            from weaktr_cli.cams import dump_cams
            from weaktr_cli.models.io import load_cam_model
            from weaktr_cli.per_image import PerImageRun

            model, _ = load_cam_model(self.cam_ckpt)
            run = PerImageRun(self.train_set, self.cams, self.config.device, resume=False,
                              progress=self.progress("dump-cams"))
            dump_cams(model, run, settings=self.dump_settings, checkpoint=self.cam_ckpt,
                      seed=self.cam_config.seed)
            return {}

        self.runner.run("dump-cams", [self.cams],
                        {"dump": dataclasses.asdict(self.dump_settings)}, [self.cam_ckpt], action)

    def crf(self) -> None:
        recipe = self.seed_recipe

        def action() -> dict[str, Any]:
            from weaktr_cli.dense_crf import get_preset
            from weaktr_cli.seeds import make_seeds

            make_seeds(self.cams, self.train_set, self.seeds, bg=recipe.bg,
                       params=get_preset(recipe.preset) if recipe.preset else None,
                       unary=recipe.unary, workers=self.config.workers, resume=False,
                       progress=self.progress("crf"))
            return {}

        self.runner.run("crf", [self.seeds], {"seeds": dataclasses.asdict(recipe)}, [self.cams],
                        action)

    def retrain(self) -> None:
        from weaktr_cli.recipes import RETRAIN_FROM_CAM

        # Without ImageNet weights, recipes may start the encoder from the CAM backbone.
        cam_ckpt = self.cam_ckpt
        encoder_init = self.config.pretrained or (
            cam_ckpt if self.recipe in RETRAIN_FROM_CAM else None)
        # The CAMs mark the seeds' ambiguous pixels when the recipe ignores them.
        seed_cams = self.cams if self.retrain_config.ambiguity is not None else None

        def action() -> dict[str, Any]:
            from weaktr_cli.retrain.loop import retrain
            from weaktr_cli.training import TrainingOptions

            (self.work / "seg.ckpt.jsonl").unlink(missing_ok=True)
            options = TrainingOptions(self.config.device, log=self.say,
                                      log_jsonl=self.work / "seg.ckpt.jsonl",
                                      progress=self.progress("retrain"))
            result = retrain(self.train_set, self.seeds, self.seg_ckpt, self.retrain_config,
                             pretrained=encoder_init, cams=seed_cams, options=options)
            return {"steps": result.steps, "tau": result.tau}

        self.runner.run("retrain", [self.seg_ckpt],
                        {"retrain": self.retrain_config.to_dict(),
                         "encoder_init": str(encoder_init)},
                        [self.seeds] + ([cam_ckpt] if encoder_init == cam_ckpt else [])
                        + ([self.cams] if seed_cams else []), action)

    def predict(self) -> None:
        def action() -> dict[str, Any]:
            from weaktr_cli.models.io import load_segmenter
            from weaktr_cli.per_image import PerImageRun
            from weaktr_cli.predict import predict_split, settings_for_checkpoint

            model, meta = load_segmenter(self.seg_ckpt)
            settings = settings_for_checkpoint(meta, self.predict_settings)
            for dataset, out in ((self.train_set, self.preds_train),
                                 (self.test_set, self.preds_test)):
                run = PerImageRun(dataset, out, self.config.device, resume=False,
                                  progress=self.progress(f"predict {dataset.split}"))
                predict_split(model, run, settings, class_names=self.train_set.class_names,
                              checkpoint=self.seg_ckpt)
            return {}

        self.runner.run("predict", [self.preds_train, self.preds_test],
                        {"predict": dataclasses.asdict(self.predict_settings)}, [self.seg_ckpt],
                        action)

    def evaluate(self) -> dict[str, Any]:
        """Score every artifact that has pixel labels; returns the run's figures."""
        # Pixel masks are optional (a dataset of one's own often has none): what has no masks
        # is not scored, and the panels are drawn all the same.
        self.unscored = [f"{d.name}/{d.split}" for d in (self.train_set, self.test_set)
                         if not d.has_masks]
        if self.unscored:
            self.say(f"[yellow]no pixel labels in {' and '.join(self.unscored)}[/]: nothing to "
                     "score there; evaluate skips it and the report draws panels only")
        bg = self.seed_recipe.bg

        def action() -> dict[str, Any]:
            scores = self._scores()
            atomic_write_text(self.scores_path, json.dumps(scores, indent=2))
            figures: dict[str, Any] = {k: v["miou"] for k, v in scores.items()}
            # Plain threshold seeds at the CRF's background level: what the CRF adds.
            figures["threshold_seeds_train"] = _sweep_at(scores["cams_train"], bg)
            figures["cams_train_threshold"] = scores["cams_train"].get("best_threshold")
            return figures

        evaluated = self.runner.run(
            "evaluate", [self.scores_path],
            {"thresholds": "default", "bg": bg, "unscored": self.unscored},
            [self.cams, self.seeds, self.preds_train, self.preds_test], action)
        return dict(evaluated.result)

    def _scores(self) -> dict[str, Any]:
        from weaktr_cli.artifacts import open_artifact
        from weaktr_cli.evaluation import evaluate_artifact
        from weaktr_cli.metrics import default_thresholds

        scores: dict[str, Any] = {}
        for name, _label, path, dataset in self._scored_artifacts():
            if not dataset.has_masks:
                scores[name] = {"miou": None, "unscored": "no pixel labels in "
                                f"{dataset.name}/{dataset.split}"}
                continue
            with open_artifact(path) as reader:
                result = evaluate_artifact(reader, dataset, thresholds=default_thresholds())
            scores[name] = result.to_dict()
            scores[name].pop("confusion", None)
        return scores

    def _scored_artifacts(self) -> list[tuple[str, str, Path, SegmentationDataset]]:
        """(score name, chart label, artifact, its dataset) of everything evaluate scores."""
        split = self.test_set.split
        return [("cams_train", "CAM (train)", self.cams, self.train_set),
                ("seeds_train", "seeds (train)", self.seeds, self.train_set),
                ("model_train", "model (train)", self.preds_train, self.train_set),
                (f"model_{split}", f"model ({split})", self.preds_test, self.test_set)]

    def report(self, figures: dict[str, Any]) -> None:
        scored = any(figures.get(k) is not None
                     for k in ("cams_train", "seeds_train", "model_train"))

        def action() -> dict[str, Any]:
            self._panels()
            if not scored:
                self.chart.unlink(missing_ok=True)  # an earlier, scored run's chart would mislead
                return {}
            self._iou_chart()
            return {}

        self.runner.run("report", [self.panels, self.chart] if scored else [self.panels],
                        {"show": self.config.show_images, "scored": scored}, [self.scores_path],
                        action)

    def _panels(self) -> None:
        from weaktr_cli.artifacts import open_artifact
        from weaktr_cli.visualize import Layer, panel_sheet

        with ExitStack() as stack:
            layers = [Layer(title, stack.enter_context(open_artifact(path)))
                      for title, path in (("CAM", self.cams), ("seeds", self.seeds),
                                          ("prediction", self.preds_train))]
            panel_sheet(self.train_set, self.train_set.ids[: self.config.show_images], layers,
                        self.panels)

    def _iou_chart(self) -> None:
        from weaktr_cli.visualize import iou_chart

        scores = json.loads(self.scores_path.read_text())
        series = {}
        for key, label, _path, _dataset in self._scored_artifacts():
            if scores[key].get("miou") is None:
                continue
            per_class = {row["id"]: row["iou"] for row in scores[key]["per_class"]}
            series[label] = [per_class.get(i) for i in range(self.train_set.num_classes)]
        iou_chart(series, self.train_set.class_names, self.chart,
                  title=f"per-class IoU, {self.config.data} ({self.recipe} recipe)")

    def write_metrics(self, figures: dict[str, Any]) -> None:
        config = self.config
        write_metrics(self.work / "metrics.json", config, self.recipe, self.runner.records,
                      figures,
                      seeds={"train-cam": self.cam_config.seed,
                             "retrain": self.retrain_config.seed},
                      splits={"train": self.train_set.split, "val": self.val_set.split,
                              "test": self.test_set.split},
                      precisions=_precisions(config.device, self.cam_config.precision,
                                             self.retrain_config.precision,
                                             self.predict_settings.precision))


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
    A rerun that skipped every phase leaves the record of the run that made its figures as it
    is: the machine, its load and the versions there are those the figures were measured with.
    """
    from weaktr_cli.run_record import machine, versions

    if all(r.skipped for r in records):
        earlier = _earlier_record(path, figures)
        if earlier is not None:
            return earlier
    record = {
        "format": METRICS_FORMAT,
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


def _earlier_record(path: Path, figures: dict[str, Any]) -> dict[str, Any] | None:
    """The record at `path` when it is one of this format with these figures, else None."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(record, dict) and record.get("format") == METRICS_FORMAT
            and record.get("figures") == figures):
        return None
    return record
