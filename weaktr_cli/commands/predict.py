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
"""


def predict(
    checkpoint: Annotated[Path | None, typer.Option(help="Segmenter checkpoint (retrain).")
                          ] = None,
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
    if (checkpoint is None) == (onnx is None):
        raise WeakTrError("pass exactly one of --checkpoint and --onnx")
    if checkpoint is not None:
        path = predict_checkpoint(
            checkpoint, data=data, data_root=data_root, split=split, images=images, out=out,
            multiscale=multiscale, flip=flip, fuse_layers=fuse_layers, crf=crf, window=window,
            stride=stride, precision=precision, shard=parse_shard(shard), resume=resume,
            device=device, output=output)
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


def predict_checkpoint(checkpoint: Path, *, data, data_root, split, images, out,
                       multiscale, flip, fuse_layers, crf, window, stride, precision, shard,
                       resume, device, output) -> Path:
    """Shared by `predict` and `evaluate --checkpoint`."""
    from weaktr_cli.predict import predict_split, settings_for_checkpoint
    from weaktr_cli.retrain import load_segmenter

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
