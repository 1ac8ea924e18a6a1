"""`weaktr export-onnx`: a verified ONNX model from a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from weaktr_cli.commands import options
from weaktr_cli.commands.output import Output
from weaktr_cli.phases import ReferenceModel

if TYPE_CHECKING:
    from weaktr_cli.export import ExportReport

HELP = """Export a checkpoint to a verified ONNX model.

The segmentation model (from retrain), or with --cam the CAM model (image to fine
CAMs). The graph takes float RGB pixels 0-255 (B, 3, H, W) and normalises
inside; metadata in the file (class names, mean/std, patch and input size, training recipe,
weaktr version) is all a consumer needs: predict --onnx applies the same test time as
predict --checkpoint. Fixed size by default; --dynamic makes batch, height and width
variable. Every export is checked with onnx.checker and compared with PyTorch through
onnxruntime (at another input size when --dynamic); a difference above --atol fails and
leaves no file.

[dim]Examples:[/]
  weaktr export-onnx --checkpoint seg.ckpt --out model.onnx
  weaktr export-onnx --checkpoint seg.ckpt --dynamic --out model.onnx
  weaktr export-onnx --reference-checkpoint checkpoint.pth --reference-normalization deit
  weaktr export-onnx --checkpoint cam.ckpt --cam --height 224 --width 224 --out cam.onnx
  weaktr predict --onnx model.onnx --images photos/ --png-dir masks/
"""


def export_onnx(
    checkpoint: Annotated[Path | None, typer.Option(
        help="A segmenter (or, with --cam, CAM) checkpoint.")] = None,
    reference: Annotated[ReferenceModel | None, options.REFERENCE] = None,
    out: Annotated[Path, options.out("ONNX file to write.")] = Path("model.onnx"),
    cam: Annotated[bool, typer.Option("--cam", help="Export the CAM model instead.")] = False,
    height: Annotated[int | None, typer.Option(
        min=1, help="Input height (default: the training crop).")] = None,
    width: Annotated[int | None, typer.Option(
        min=1, help="Input width (default: the training crop).")] = None,
    dynamic: Annotated[bool, typer.Option(help="Variable batch, height and width.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch of a fixed-size export.")] = 1,
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 18).")] = 18,
    variant: Annotated[str, typer.Option(help="With --cam: fine, cross or coarse.")] = "fine",
    all_layers: Annotated[bool | None, typer.Option(
        help="Output every decoder layer (for 0.8 P1 + P2 fusion) or the last only "
             "(default: what the test time of the model's recipe uses).")] = None,
    atol: Annotated[float, typer.Option(help="Max abs difference allowed vs PyTorch.")] = 1e-4,
    *,
    output: Annotated[Output, options.OUTPUT],
) -> None:
    from weaktr_cli.errors import WeakTrError
    from weaktr_cli.export import export_checkpoint

    if (checkpoint is None) == (reference is None):
        raise WeakTrError("pass exactly one of --checkpoint and --reference-checkpoint")
    if reference is not None:
        if cam:
            raise WeakTrError("--cam exports weaktr CAM checkpoints, not reference segmenters")
        from weaktr_cli.export import export_reference_checkpoint

        output.log(f"exporting {reference.checkpoint} (reference segmenter) to ONNX ...")
        report = export_reference_checkpoint(
            reference.checkpoint, out, normalization=reference.normalization,
            num_heads=reference.heads, height=height, width=width, dynamic=dynamic,
            batch_size=batch_size, opset=opset, all_layers=all_layers, atol=atol)
        _report(output, report)
        return
    assert checkpoint is not None
    report = export_checkpoint(checkpoint, out, height=height, width=width, dynamic=dynamic,
                               batch_size=batch_size, opset=opset, variant=variant,
                               all_layers=all_layers, atol=atol,
                               expect="cam" if cam else "segmenter", log=output.log)
    _report(output, report)


def _report(output: Output, report: ExportReport) -> None:
    payload = report.to_dict()

    def render(console: Console) -> None:
        console.print(str(report.path))

    for check in report.checks:
        output.log(f"onnxruntime vs PyTorch at {tuple(check.shape)}: max abs diff "
                   f"{check.max_abs_diff:.2e} (largest value {check.max_abs_ref:.3g})")
    output.result(payload, render)
