"""`weaktr predict`: segment a split or a folder of images with a retrained model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from weaktr_cli.commands import options
from weaktr_cli.commands.output import Output
from weaktr_cli.phases import ReferenceModel

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


def predict(
    checkpoint: Annotated[Path | None, typer.Option(help="Segmenter checkpoint (retrain).")
                          ] = None,
    reference: Annotated[ReferenceModel | None, options.REFERENCE] = None,
    onnx: Annotated[Path | None, typer.Option(
        "--onnx", help="An exported ONNX model instead (onnxruntime, no torch).")] = None,
    data: options.DataOptional = None,
    data_root: options.DataRoot = None,
    split: options.Split = "val",
    images: Annotated[Path | None, typer.Option(
        help="Predict every image in this folder instead of a dataset split.")] = None,
    out: Annotated[Path, options.out("labels artifact to write.")] = Path("preds.h5"),
    png_dir: Annotated[Path | None, typer.Option(help="Also write palette PNGs here.")] = None,
    recipe: options.Recipe = None,
    multiscale: Annotated[bool, typer.Option(
        help="Scales 0.5-1.75 with flips (docs/method.md) instead of one scale.")] = False,
    flip: Annotated[bool | None, typer.Option("--flip/--no-flip")] = None,
    fuse_layers: Annotated[bool, typer.Option(
        help="Fuse the decoder layers as 0.8 P1 + P2 (the reference's inference).")] = False,
    crf: Annotated[str | None, typer.Option(
        help="Test-time CRF preset (voc-test, ...) or none (default: the dataset's recipe: "
             "voc-test for voc and shapes, coco-test for coco).")] = None,
    window: Annotated[int | None, typer.Option(help="Sliding window (default: training crop).")
                      ] = None,
    stride: Annotated[int | None, typer.Option(help="Window stride (default: 2/3 window).")
                      ] = None,
    precision: options.Precision = None,
    shard: options.Shard = None,
    resume: options.ResumePartial = True,
    device: options.Device = "auto",
    *,
    output: Annotated[Output, options.OUTPUT],
) -> None:
    from weaktr_cli.phases import predict_run
    from weaktr_cli.shards import parse_shard

    path = predict_run(
        checkpoint=checkpoint, reference=reference, onnx=onnx,
        data=None if data is None else str(data), data_root=data_root, split=split,
        images=images, out=out, multiscale=multiscale, flip=flip, fuse_layers=fuse_layers,
        crf=crf, window=window, stride=stride, precision=precision, shard=parse_shard(shard),
        resume=resume, device=device, png_dir=png_dir, log=output.log, bar=output.progress,
        recipe=recipe)
    output.artifact(path)
