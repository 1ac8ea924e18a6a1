"""Each phase as a command runs it: from dataset names, paths, a recipe name and overrides.

Every `weaktr` subcommand parses its flags and makes one call here; the call resolves the
recipe (`weaktr_cli.recipes.resolve`), opens the datasets and models, and runs the phase's
library function. Nothing here imports torch at import time, so the `crf` and
`predict --onnx` commands stay light.

`bar(description, total)` is a context manager yielding `update(done, total)` (the CLI's
progress bar); `log(message)` prints a note.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weaktr_cli.errors import WeakTrError

if TYPE_CHECKING:
    from weaktr_cli.data.base import SegmentationDataset
    from weaktr_cli.dense_crf import CrfParams
    from weaktr_cli.retrain.loop import RetrainResult
    from weaktr_cli.settings import CamSettings, CamTrainConfig, RetrainConfig
    from weaktr_cli.train_cam import CamTrainResult

__all__ = [
    "ReferenceModel",
    "crf_run",
    "dump_cams_run",
    "evaluate_run",
    "predict_run",
    "retrain_run",
    "train_cam_run",
]

Update = Callable[..., None]
Bar = Callable[[str, "int | None"], AbstractContextManager[Update]]
Log = Callable[[str], None]


@contextlib.contextmanager
def _no_bar(_description: str, _total: int | None = None) -> Iterator[Update]:
    yield lambda *_args, **_kwargs: None


def _quiet(_message: str) -> None:
    pass


# ----------------------------------------------------------------------------- phase 1


def train_cam_run(*, data: str, split: str, val_split: str | None, data_root: Path | None,
                  out: Path, recipe: str | None, overrides: dict[str, Any],
                  pretrained: Path | None = None, from_scratch: bool = False,
                  resume: bool = False, device: str = "auto",
                  log_jsonl: Path | None = None, log: Log = _quiet, bar: Bar = _no_bar,
                  ) -> tuple[CamTrainResult, CamTrainConfig]:
    """Train the CAM model of recipe `recipe` (default: the dataset's) with `overrides`;
    `val_split` None skips validation. A paper recipe needs `pretrained` weights unless
    `from_scratch`. Returns the result and the settings used."""
    from weaktr_cli.data import open_dataset
    from weaktr_cli.recipes import check_encoder_init, qualify_recipe, resolve
    from weaktr_cli.train_cam import cam_miou_scorer, train_cam
    from weaktr_cli.training import TrainingOptions

    recipe_name = qualify_recipe(recipe, data)
    config: CamTrainConfig = resolve("cam", recipe_name, **overrides)
    config.check()
    note = check_encoder_init(recipe_name, pretrained, from_scratch)
    if note:
        log(note)
    train_set = open_dataset(data, split, data_root)
    val_set = None if val_split is None else open_dataset(data, val_split, data_root)
    cam_miou = None
    if config.select == "cam-miou":
        if val_set is None:
            raise WeakTrError("--select cam-miou needs --val-split")
        log(f"[yellow]--select cam-miou scores CAMs with the pixel labels of "
            f"{val_set.split!r}: not a weakly-supervised protocol[/]")
        cam_miou = cam_miou_scorer(val_set, resolve("dump", recipe_name))
    with bar("train-cam", None) as update:
        options = TrainingOptions(device, resume, log=log, progress=update,
                                  log_jsonl=log_jsonl or out.with_name(out.name + ".jsonl"))
        result = train_cam(train_set, val_set, out, config, pretrained=pretrained,
                           options=options, cam_miou_fn=cam_miou)
    return result, config


# ----------------------------------------------------------------------------- phase 2


def dump_cams_run(*, checkpoint: Path | None, reference_checkpoint: Path | None,
                  data: str | None, split: str, data_root: Path | None, out: Path,
                  overrides: dict[str, Any], max_size: int | None = None,
                  shard: tuple[int, int] | None = None, resume: bool = True,
                  device: str = "auto", bar: Bar = _no_bar,
                  recipe: str | None = None,
                  ) -> tuple[Path, SegmentationDataset, CamSettings]:
    """CAMs of a split from a train-cam checkpoint or an official WeakTr one; the dataset
    defaults to the checkpoint's (VOC for an official one), the settings to its recipe.
    `max_size` caps the longest image side the model sees (None: the settings', 0: no cap)."""
    from weaktr_cli.cams import dump_cams
    from weaktr_cli.data import open_dataset
    from weaktr_cli.per_image import PerImageRun
    from weaktr_cli.recipes import qualify_recipe, resolve

    if (checkpoint is None) == (reference_checkpoint is None):
        raise WeakTrError("pass exactly one of --checkpoint and --reference-checkpoint")
    seed, class_names = None, None
    if checkpoint is not None:
        from weaktr_cli.models.io import load_cam_model

        model, meta = load_cam_model(checkpoint)
        dataset_name = data or meta.get("dataset", "shapes")
        seed = meta.get("train", {}).get("seed")
        class_names = meta.get("class_names")
    else:
        from weaktr_cli.models.reference import load_reference_checkpoint

        assert reference_checkpoint is not None
        model = load_reference_checkpoint(reference_checkpoint)
        dataset_name = data or "voc"
    dataset = open_dataset(dataset_name, split, data_root)
    settings: CamSettings = resolve("dump", qualify_recipe(recipe, str(dataset_name)),
                                    **overrides)
    if max_size is not None:
        settings = dataclasses.replace(settings, max_size=max_size or None)
    with bar(f"dump-cams {dataset.name}/{dataset.split}", len(dataset)) as update:
        run = PerImageRun(dataset, out, device, shard, resume, progress=update)
        path = dump_cams(model, run, settings=settings,
                         checkpoint=checkpoint or reference_checkpoint, seed=seed,
                         class_names=class_names)
    return path, dataset, settings


# ----------------------------------------------------------------------------- phase 3


def crf_run(*, cams: Path, data: str | None, data_root: Path | None, out: Path,
            bg: float | None, preset: str | None, no_crf: bool, unary: str,
            ignore_disagreement: bool, crf_overrides: dict[str, Any], workers: int = 1,
            shard: tuple[int, int] | None = None, resume: bool = True, bar: Bar = _no_bar,
            recipe: str | None = None,
            ) -> tuple[Path, float, CrfParams | None]:
    """Seeds from a cams artifact: background `bg` (default: the recipe's), then a dense CRF
    with `preset` (default: the recipe's) and `crf_overrides`, unless `no_crf`. Returns the
    artifact, the background level and the CRF parameters used."""
    from weaktr_cli.artifacts import read_meta
    from weaktr_cli.data import open_artifact_dataset
    from weaktr_cli.dense_crf import get_preset
    from weaktr_cli.recipes import qualify_recipe, resolve
    from weaktr_cli.seeds import make_seeds

    _check_no_crf(no_crf, preset, crf_overrides)
    meta = read_meta(cams)
    if meta.kind != "cams":
        raise WeakTrError(f"{cams} is a {meta.kind!r} artifact, but --cams needs a 'cams' one")
    dataset = open_artifact_dataset(meta, data=data, root=data_root)
    seed_recipe = resolve("seeds", qualify_recipe(recipe, dataset.name))
    params = None
    preset_name = preset or seed_recipe.preset
    if not no_crf and preset_name is not None:  # a recipe without a preset means no CRF
        params = dataclasses.replace(get_preset(preset_name),
                                     **{k: v for k, v in crf_overrides.items() if v is not None})
    threshold = seed_recipe.bg if bg is None else bg
    with bar(f"crf {dataset.name}/{dataset.split}", None) as update:
        path = make_seeds(cams, dataset, out, bg=threshold, params=params, unary=unary,
                          mark_disagreement=ignore_disagreement, workers=workers,
                          shard=shard, resume=resume, progress=update)
    return path, threshold, params


def _check_no_crf(no_crf: bool, preset: str | None, crf_overrides: dict[str, Any]) -> None:
    """CRF settings with --no-crf do nothing: a contradiction, not something to drop silently."""
    given = ([f"--preset {preset}"] if preset else []) + [
        f"--{k.replace('_', '-')}" for k, v in crf_overrides.items() if v is not None]
    if no_crf and given:
        raise WeakTrError(f"--no-crf and {', '.join(given)} contradict each other: without the "
                          "CRF its parameters do nothing", hint="drop one of them")


# ----------------------------------------------------------------------------- phase 4


def retrain_run(*, seeds: Path, data: str | None, data_root: Path | None, out: Path,
                recipe: str | None, overrides: dict[str, Any], tau: str | None = None,
                clip: bool | None = None,
                bg: float | None = None, pretrained: Path | None = None,
                from_scratch: bool = False, resume: bool = False,
                cams: Path | None = None, ambiguity: str | None = None,
                device: str = "auto", log_jsonl: Path | None = None, log: Log = _quiet,
                bar: Bar = _no_bar) -> tuple[RetrainResult, RetrainConfig]:
    """Retrain on a seeds (or cams) artifact with recipe `recipe` (default: the dataset's).

    `tau` (a number or "auto", as --tau) replaces the recipe's clipping threshold; asking for
    a threshold asks for clipping unless `clip` says otherwise;
    seeds from a cams artifact use `bg`, else the recipe's background level (no CRF).
    `ambiguity` ("none" or a ratio) replaces the recipe's; `cams` are the CAMs it reads
    (default: the seeds' parent). A paper recipe needs `pretrained` encoder weights unless
    `from_scratch`.
    """
    from weaktr_cli.artifacts import read_meta
    from weaktr_cli.data import open_artifact_dataset
    from weaktr_cli.recipes import check_encoder_init, qualify_recipe, recipe_for_dataset, resolve
    from weaktr_cli.retrain.loop import retrain
    from weaktr_cli.retrain.seed_source import SeedSource
    from weaktr_cli.training import TrainingOptions

    overrides = {**overrides, "tau": _tau_or_auto(tau)}
    if clip is False and tau is not None:
        raise WeakTrError(f"--no-clip and --tau {tau} contradict each other: without clipping "
                          "there is no threshold", hint="drop one of them")
    meta = read_meta(seeds)
    dataset = open_artifact_dataset(meta, data=data, root=data_root)
    recipe_name = qualify_recipe(recipe, dataset.name)
    if clip is None and tau is not None:
        clip = True  # asking for a threshold asks for clipping
    config: RetrainConfig = resolve("retrain", recipe_name, **overrides, clip=clip)
    note = check_encoder_init(recipe_name, pretrained, from_scratch)
    if note:
        log(note)
    if ambiguity is not None:
        config = dataclasses.replace(config, ambiguity=_ratio_or_none(ambiguity, "--ambiguity"))
        config.check()
    threshold = None
    if meta.kind == "cams":
        threshold = bg if bg is not None else resolve("seeds",
                                                      recipe_for_dataset(recipe_name)).bg
        log(f"seeds from CAMs with background threshold {threshold} (no CRF)")
    source = SeedSource(seeds, bg=threshold, cams=cams, ambiguity=config.ambiguity)
    if source.cams_path is not None:
        log(f"ignoring seed pixels where two classes' CAMs are within {config.ambiguity}x "
            f"({source.cams_path.name})")
    with bar("retrain", None) as update:
        options = TrainingOptions(device, resume, log=log, progress=update,
                                  log_jsonl=log_jsonl or out.with_name(out.name + ".jsonl"))
        result = retrain(dataset, source, out, config, pretrained=pretrained, options=options)
    return result, config


def _tau_or_auto(text: str | None) -> float | str | None:
    """--tau: "auto", a number, or None (the recipe's)."""
    if text is None or text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise WeakTrError(f"invalid --tau {text!r}", hint="a number or 'auto'") from None


def _ratio_or_none(text: str, option: str) -> float | None:
    """"none" -> None, else a float (validated by the config's check)."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise WeakTrError(f"invalid {option} {text!r}", hint="a ratio in (0, 1] or none") \
            from None


# ----------------------------------------------------------------------------- inference


def _open(data: str, data_root: Path | None, split: str, images: Path | None,
          class_names: list[str] | tuple[str, ...]) -> SegmentationDataset:
    from weaktr_cli.data import open_dataset

    if images is not None:
        from weaktr_cli.data.folder import ImageFolderDataset

        return ImageFolderDataset(images, class_names)
    return open_dataset(data, split, data_root)


def _model_recipe(recipe: str | None, data: str | None, trained: str | None,
                  model_dataset: str | None, log: Log) -> str:
    """`predict_defaults.predict_recipe`, saying so when the model's recipe is unknown here."""
    from weaktr_cli.predict_defaults import predict_recipe

    name = predict_recipe(recipe, data=data, trained=trained, model_dataset=model_dataset)
    if recipe is None and trained is not None and name != trained:
        log(f"[yellow]the model was trained with recipe {trained!r}, which this weaktr does "
            f"not know: predicting with the {name} recipe's test time[/]")
    return name


@dataclasses.dataclass(frozen=True)
class ReferenceModel:
    """A released hustvl/WeakTr segmentation checkpoint and how to read it: its input
    normalisation ("deit" or "vit"; None: the variant.yml beside it) and head count."""

    checkpoint: Path
    normalization: str | None = None
    heads: int | None = None


def predict_run(*, checkpoint: Path | None = None, reference: ReferenceModel | None = None,
                onnx: Path | None = None, data: str | None, data_root: Path | None,
                split: str, images: Path | None, out: Path, multiscale: bool = False,
                flip: bool | None = None, fuse_layers: bool = False, crf: str | None = None,
                window: int | None = None, stride: int | None = None,
                precision: str | None = None, shard: tuple[int, int] | None = None,
                resume: bool = True, device: str = "auto", png_dir: Path | None = None,
                log: Log = _quiet, bar: Bar = _no_bar, recipe: str | None = None) -> Path:
    """Predict a split (or the images of a folder) into a labels artifact with a segmenter
    checkpoint or its ONNX export (both: the test time of the recipe the model was trained
    with, `weaktr_cli.predict_defaults`) or a released reference checkpoint (the reference's
    test time). With `png_dir`, also write the label maps there as palette PNGs."""
    if sum(x is not None for x in (checkpoint, reference, onnx)) != 1:
        raise WeakTrError("pass exactly one of --checkpoint, --reference-checkpoint and --onnx")
    if png_dir is not None:
        from weaktr_cli.label_pngs import check_png_dir

        check_png_dir(png_dir)  # before the run, not after it
    if onnx is not None:
        if precision is not None:
            raise WeakTrError("--precision applies to PyTorch models: onnxruntime runs the "
                              "ONNX model in fp32", hint="drop --precision with --onnx")
        path = _predict_onnx(
            onnx, data=data, data_root=data_root, split=split, images=images, out=out,
            multiscale=multiscale, flip=flip, fuse_layers=fuse_layers, crf=crf, window=window,
            stride=stride, shard=shard, resume=resume, log=log, bar=bar, recipe=recipe)
    else:
        path = _predict_checkpoint(
            checkpoint, reference, data=data, data_root=data_root, split=split, images=images,
            out=out, multiscale=multiscale, flip=flip, fuse_layers=fuse_layers, crf=crf,
            window=window, stride=stride, precision=precision, shard=shard, resume=resume,
            device=device, log=log, bar=bar, recipe=recipe)
    if png_dir is not None:
        from weaktr_cli.label_pngs import write_png_dir

        count = write_png_dir(path, png_dir)
        log(f"wrote {count} PNG{'' if count == 1 else 's'} to {png_dir}")
    return path


def _predict_checkpoint(checkpoint: Path | None, reference: ReferenceModel | None, *,
                        data: str | None, data_root: Path | None, split: str,
                        images: Path | None, out: Path, multiscale: bool, flip: bool | None,
                        fuse_layers: bool, crf: str | None, window: int | None,
                        stride: int | None, precision: str | None,
                        shard: tuple[int, int] | None, resume: bool, device: str, log: Log,
                        bar: Bar, recipe: str | None = None) -> Path:
    from weaktr_cli.per_image import PerImageRun
    from weaktr_cli.predict import predict_split

    fixed = {k: v for k, v in {"window": window, "stride": stride,
                               "precision": precision}.items() if v is not None}
    if reference is not None:
        model, meta, dataset, settings = _open_reference(
            reference, data=data, data_root=data_root, split=split, images=images,
            multiscale=multiscale, flip=flip, crf=crf)
        settings = dataclasses.replace(settings, **fixed)
        checkpoint = reference.checkpoint
    else:
        assert checkpoint is not None
        model, meta, dataset, settings = _open_segmenter(
            checkpoint, data=data, data_root=data_root, split=split, images=images,
            multiscale=multiscale, flip=flip, fuse_layers=fuse_layers, crf=crf, fixed=fixed,
            recipe=recipe, log=log)
    with bar(f"predict {dataset.name}/{dataset.split}", len(dataset)) as update:
        run = PerImageRun(dataset, out, device, shard, resume, progress=update)
        return predict_split(model, run, settings, class_names=meta["class_names"],
                             checkpoint=checkpoint)


def _open_segmenter(checkpoint: Path, *, data: str | None, data_root: Path | None, split: str,
                    images: Path | None, multiscale: bool, flip: bool | None,
                    fuse_layers: bool, crf: str | None, fixed: dict[str, Any],
                    recipe: str | None = None, log: Log = _quiet,
                    ) -> tuple[Any, dict[str, Any], SegmentationDataset, Any]:
    """(model, checkpoint meta, dataset, settings) for a weaktr segmenter checkpoint."""
    from weaktr_cli.models.io import load_segmenter
    from weaktr_cli.predict import settings_for_checkpoint
    from weaktr_cli.predict_defaults import predict_settings

    model, meta = load_segmenter(checkpoint)
    dataset_name = data or meta.get("dataset", "shapes")
    dataset = _open(dataset_name, data_root, split, images, meta["class_names"])
    name = _model_recipe(recipe, data, meta.get("recipe"), meta.get("dataset"), log)
    base = predict_settings(name, crf=crf, flip=flip, multiscale=multiscale,
                            fuse_layers=fuse_layers)
    return model, meta, dataset, settings_for_checkpoint(meta, base, **fixed)


def _open_reference(reference: ReferenceModel, *, data: str | None, data_root: Path | None,
                    split: str, images: Path | None, multiscale: bool, flip: bool | None,
                    crf: str | None) -> tuple[Any, dict[str, Any], SegmentationDataset, Any]:
    """(model, meta with class_names, dataset, settings) for a released reference checkpoint."""
    from weaktr_cli.predict_defaults import crf_choice
    from weaktr_cli.reference_model import open_reference_segmenter, reference_predict_settings

    checkpoint = reference.checkpoint
    model, meta = open_reference_segmenter(checkpoint, normalization=reference.normalization,
                                           num_heads=reference.heads)
    n_cls = meta["model"]["n_cls"]
    name = data or meta["dataset"]
    if name is None:
        raise WeakTrError(f"{checkpoint} predicts {n_cls} classes, neither VOC's 21 nor COCO's 91",
                          hint="name its dataset with --data")
    if images is not None:
        from weaktr_cli.data.coco import COCO_CLASSES
        from weaktr_cli.data.voc import VOC_CLASSES

        names = {"voc": VOC_CLASSES, "coco": COCO_CLASSES}.get(str(name))
        if names is None:
            raise WeakTrError("--images with a reference checkpoint needs --data voc or coco")
        dataset = _open(name, data_root, split, images, names)
    else:
        dataset = _open(name, data_root, split, None, ())
    if dataset.num_classes != n_cls:
        raise WeakTrError(f"{checkpoint} predicts {n_cls} classes, dataset {dataset.name!r} has "
                          f"{dataset.num_classes}", hint="pass the dataset it was trained on")
    meta["class_names"] = list(dataset.class_names)
    settings = reference_predict_settings(meta, str(name), multiscale=multiscale,
                                          crf="default" if crf is None else crf_choice(crf, None),
                                          flip=flip)
    return model, meta, dataset, settings


def _predict_onnx(onnx: Path, *, data: str | None, data_root: Path | None, split: str,
                  images: Path | None, out: Path, multiscale: bool, flip: bool | None,
                  fuse_layers: bool, crf: str | None, window: int | None, stride: int | None,
                  shard: tuple[int, int] | None, resume: bool, log: Log, bar: Bar,
                  recipe: str | None = None) -> Path:
    """`_predict_checkpoint` for an ONNX export: the same recipe (the file records the
    checkpoint's) and flags make the same settings; window and stride default to the
    export's crop (or fixed input) and 2/3 of it, as a checkpoint's."""
    from weaktr_cli.onnx_infer import OnnxPredictSettings, predict_split_onnx, read_onnx_info
    from weaktr_cli.per_image import PerImageRun
    from weaktr_cli.predict_defaults import predict_settings

    info = read_onnx_info(onnx)
    model_dataset = info.extra.get("dataset")
    dataset = _open(data or model_dataset or "shapes", data_root, split, images,
                    info.class_names)
    name = _model_recipe(recipe, data, info.recipe, model_dataset, log)
    base = predict_settings(name, crf=crf, flip=flip, multiscale=multiscale,
                            fuse_layers=fuse_layers)
    weights = base.layer_weights
    if weights is not None and not fuse_layers and len(weights) != info.layers:
        log(f"[yellow]{onnx.name} outputs {info.layers} decoder layer(s), the {name} recipe "
            f"fuses {len(weights)}: predicting from the last layer (re-export with "
            "--all-layers to match predict --checkpoint)[/]")
        base = dataclasses.replace(base, layer_weights=None)
    settings = OnnxPredictSettings.from_predict_settings(
        {**base.to_dict(), "window": window, "stride": stride})
    with bar(f"predict (onnx) {dataset.name}/{dataset.split}", len(dataset)) as update:
        run = PerImageRun(dataset, out, shard=shard, resume=resume, progress=update)
        return predict_split_onnx(onnx, run, settings)


def evaluate_run(*, artifact: Path | None, checkpoint: Path | None = None,
                 reference: ReferenceModel | None = None, data: str | None,
                 data_root: Path | None, split: str | None, thresholds: str,
                 multiscale: bool = False, fuse_layers: bool = False, crf: str | None = None,
                 predictions: Path | None = None, device: str = "auto",
                 out: Path | None = None, bar: Bar = _no_bar,
                 search_start: float = 0.40) -> dict[str, Any]:
    """Score an artifact (or the predictions of a segmenter or reference checkpoint, kept at
    `predictions` if given) against the ground truth; returns the metrics (also written to
    `out` as JSON if given)."""
    import json
    import tempfile

    from weaktr_cli.artifacts import open_artifact
    from weaktr_cli.data import open_artifact_dataset
    from weaktr_cli.evaluation import evaluate_artifact, parse_thresholds

    sweep = parse_thresholds(thresholds)
    if sum(x is not None for x in (artifact, checkpoint, reference)) != 1:
        raise WeakTrError("pass one of an artifact, --checkpoint and --reference-checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        if checkpoint is not None or reference is not None:
            artifact = predict_run(
                checkpoint=checkpoint, reference=reference, data=data, data_root=data_root,
                split=split or "val", images=None, out=predictions or Path(tmp) / "preds.h5",
                multiscale=multiscale, fuse_layers=fuse_layers, crf=crf, resume=False,
                device=device, bar=bar)
        assert artifact is not None  # one of the three was given, and predict filled it in
        with open_artifact(artifact) as reader:
            dataset = open_artifact_dataset(reader.meta, data=data, split=split, root=data_root)
            with bar(f"evaluate {artifact.name}", len(reader)) as update:
                result = evaluate_artifact(reader, dataset, thresholds=sweep, progress=update,
                                           reference_start=search_start)
    # Predictions made in the temporary folder are gone: name the checkpoint instead.
    kept = artifact if checkpoint is None and reference is None else predictions
    payload = {"artifact": str(kept) if kept else None,
               "checkpoint": str(checkpoint) if checkpoint is not None else None,
               "dataset": dataset.name, "split": dataset.split, **result.to_dict()}
    if out is not None:
        from weaktr_cli.files import atomic_write_text

        atomic_write_text(out, json.dumps(payload, indent=2))
    return payload
