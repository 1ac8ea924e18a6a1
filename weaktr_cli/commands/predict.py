"""`weaktr predict`: segment a split or a folder of images with a retrained model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from weaktr_cli.commands import options
from weaktr_cli.commands.output import Output

if TYPE_CHECKING:
    from weaktr_cli.predict import PredictSettings

#: METHOD.md Phase 4 inference: ratios 0.5-1.75 of the image
MULTISCALE = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

HELP = """Predict label maps with a retrained model into a labels artifact.

Sliding windows of the training crop, optional multi-scale with flips, the reference's
two-layer fusion (0.8 P1 + P2) and test-time CRF. --images predicts any folder of images;
--png-dir also writes palette PNGs. Resumable; prints the artifact path.

[dim]Examples:[/]
  weaktr predict --checkpoint seg.ckpt --split val --out preds.h5
  weaktr predict --checkpoint seg.ckpt --data voc --data-root ~/VOCdevkit --split val \\
      --multiscale --crf voc-test --out preds.h5
  weaktr predict --checkpoint seg.ckpt --images photos/ --png-dir masks/ --out photos.h5
  weaktr predict --reference-checkpoint checkpoint.pth --data voc --split val --multiscale

--reference-checkpoint runs a released hustvl/WeakTr segmentation checkpoint with the
reference's own test-time procedure and the dataset's test CRF (docs/REPRODUCING.md).
"""

#: Options of the released reference checkpoints, shared by predict, evaluate, export-onnx.
ReferenceCheckpoint = Annotated[Path | None, typer.Option(
    help="A released hustvl/WeakTr segmentation checkpoint (checkpoint.pth), loaded strictly "
         "and run with the reference's test-time procedure.", rich_help_panel="Model")]
ReferenceNormalization = Annotated[str | None, typer.Option(
    help="Its input normalisation: deit (DeiT-S) or vit (ViT-S); default the variant.yml "
         "beside it.", rich_help_panel="Model")]
ReferenceHeads = Annotated[int | None, typer.Option(
    min=1, help="Its attention heads (default: width // 64, as the reference).",
    rich_help_panel="Model")]


def predict(
    checkpoint: Annotated[Path | None, typer.Option(help="Segmenter checkpoint (retrain).")
                          ] = None,
    reference_checkpoint: ReferenceCheckpoint = None,
    reference_normalization: ReferenceNormalization = None,
    reference_heads: ReferenceHeads = None,
    onnx: Annotated[Path | None, typer.Option(
        "--onnx", help="An exported ONNX model instead (onnxruntime, no torch).")] = None,
    data: options.DataOptional = None,
    data_root: options.DataRoot = None,
    split: options.Split = "val",
    images: Annotated[Path | None, typer.Option(
        help="Predict every image in this folder instead of a dataset split.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="labels artifact to write.")] = Path(
        "preds.h5"),
    png_dir: Annotated[Path | None, typer.Option(help="Also write palette PNGs here.")] = None,
    multiscale: Annotated[bool, typer.Option(
        help="Scales 0.5-1.75 with flips (METHOD.md) instead of one scale.")] = False,
    flip: Annotated[bool | None, typer.Option("--flip/--no-flip")] = None,
    fuse_layers: Annotated[bool, typer.Option(
        help="Fuse the decoder layers as 0.8 P1 + P2 (the reference's inference).")] = False,
    crf: Annotated[str | None, typer.Option(
        help="Test-time CRF preset (voc-test, ...) or none (default: the dataset's recipe: "
             "voc-test for shapes, none for voc and coco).")] = None,
    window: Annotated[int | None, typer.Option(help="Sliding window (default: training crop).")
                      ] = None,
    stride: Annotated[int | None, typer.Option(help="Window stride (default: 2/3 window).")
                      ] = None,
    precision: Annotated[str | None, typer.Option(help="auto, fp32, bf16 or fp16.")] = None,
    shard: options.Shard = None,
    resume: Annotated[bool, typer.Option(help="Continue OUT.partial if present.")] = True,
    device: options.Device = "auto",
    json_mode: options.Json = False,
    quiet: options.Quiet = False,
) -> None:
    from weaktr_cli.errors import WeakTrError
    from weaktr_cli.shards import parse_shard

    output = Output(json_mode=json_mode, quiet=quiet)
    if sum(x is not None for x in (checkpoint, reference_checkpoint, onnx)) != 1:
        raise WeakTrError("pass exactly one of --checkpoint, --reference-checkpoint and --onnx")
    model = checkpoint or reference_checkpoint
    if model is not None:
        path = predict_checkpoint(
            model, data=data, data_root=data_root, split=split, images=images, out=out,
            multiscale=multiscale, flip=flip, fuse_layers=fuse_layers, crf=crf, window=window,
            stride=stride, precision=precision, shard=parse_shard(shard), resume=resume,
            device=device, output=output, reference=reference_checkpoint is not None,
            reference_normalization=reference_normalization, reference_heads=reference_heads)
    else:
        path = _predict_onnx(onnx, data, data_root, split, images, out, flip, crf, output,
                             parse_shard(shard), resume)
    if png_dir is not None:
        from weaktr_cli.predict import write_png_dir

        count = write_png_dir(path, png_dir)
        output.log(f"wrote {count} PNGs to {png_dir}")
    output.artifact(path)


def _open(data, data_root, split, images, class_names):
    from weaktr_cli.data import open_dataset

    if images is not None:
        from weaktr_cli.data.folder import ImageFolderDataset

        return ImageFolderDataset(images, class_names)
    return open_dataset(data, split, data_root)


def _predict_recipe(dataset_name: str) -> PredictSettings:
    """The dataset's predict settings (VOC's for datasets without a recipe)."""
    from weaktr_cli.recipes import PREDICT_RECIPES

    return PREDICT_RECIPES.get(dataset_name, PREDICT_RECIPES["voc"])


def _crf_choice(crf: str | None, recipe_crf: str | None) -> str | None:
    """--crf: a preset name, "none", or unset for the recipe's."""
    if crf is None:
        return recipe_crf
    return None if crf.lower() == "none" else crf


def _open_reference(checkpoint, *, data, data_root, split, images, multiscale, flip, crf,
                    normalization, heads):
    """(model, meta with class_names, dataset, settings) for a released reference checkpoint."""
    from weaktr_cli.errors import WeakTrError
    from weaktr_cli.reference_model import open_reference_segmenter, reference_predict_settings

    model, meta = open_reference_segmenter(checkpoint, normalization=normalization,
                                           num_heads=heads)
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
        dataset = _open(name, data_root, split, None, None)
    if dataset.num_classes != n_cls:
        raise WeakTrError(f"{checkpoint} predicts {n_cls} classes, dataset {dataset.name!r} has "
                          f"{dataset.num_classes}", hint="pass the dataset it was trained on")
    meta["class_names"] = list(dataset.class_names)
    settings = reference_predict_settings(meta, str(name), multiscale=multiscale,
                                          crf="default" if crf is None else _crf_choice(crf, None),
                                          flip=flip)
    return model, meta, dataset, settings


def predict_checkpoint(checkpoint: Path, *, data, data_root, split, images, out,
                       multiscale, flip, fuse_layers, crf, window, stride, precision, shard,
                       resume, device, output, reference: bool = False,
                       reference_normalization: str | None = None,
                       reference_heads: int | None = None) -> Path:
    """Shared by `predict` and `evaluate --checkpoint` / `--reference-checkpoint`."""
    from weaktr_cli.predict import predict_split, settings_for_checkpoint
    from weaktr_cli.retrain import load_segmenter

    if reference:
        model, meta, dataset, settings = _open_reference(
            checkpoint, data=data, data_root=data_root, split=split, images=images,
            multiscale=multiscale, flip=flip, crf=crf, normalization=reference_normalization,
            heads=reference_heads)
        fixed = {k: v for k, v in {"window": window, "stride": stride,
                                   "precision": precision}.items() if v is not None}
        settings = dataclasses.replace(settings, **fixed)
        with output.progress(f"predict {dataset.name}/{dataset.split}", len(dataset)) as update:
            return predict_split(model, dataset, out, settings, class_names=meta["class_names"],
                                 device=device, shard=shard, resume=resume,
                                 checkpoint=checkpoint, progress=update)
    model, meta = load_segmenter(checkpoint)
    dataset_name = data or meta.get("dataset", "shapes")
    dataset = _open(dataset_name, data_root, split, images, meta["class_names"])
    base = _predict_recipe(str(dataset_name))
    overrides = {k: v for k, v in {"flip": flip, "window": window, "stride": stride,
                                   "precision": precision}.items() if v is not None}
    overrides["crf"] = _crf_choice(crf, base.crf)
    if multiscale:
        overrides["scales"] = MULTISCALE
    if fuse_layers:
        overrides["layer_weights"] = (0.8, 1.0)
    settings = settings_for_checkpoint(meta, base, **overrides)
    with output.progress(f"predict {dataset.name}/{dataset.split}", len(dataset)) as update:
        return predict_split(model, dataset, out, settings, class_names=meta["class_names"],
                             device=device, shard=shard, resume=resume, checkpoint=checkpoint,
                             progress=update)


def _predict_onnx(onnx, data, data_root, split, images, out, flip, crf, output, shard, resume
                  ) -> Path:
    from weaktr_cli.onnx_infer import OnnxPredictSettings, predict_split_onnx, read_onnx_info

    info = read_onnx_info(onnx)
    dataset = _open(data or "shapes", data_root, split, images, info.class_names)
    settings = OnnxPredictSettings(crf=_crf_choice(crf, _predict_recipe(data or "shapes").crf))
    if flip is not None:
        settings = dataclasses.replace(settings, flip=flip)
    with output.progress(f"predict (onnx) {dataset.name}/{dataset.split}", len(dataset)) as up:
        return predict_split_onnx(onnx, dataset, out, settings, shard=shard, resume=resume,
                                  progress=up)
