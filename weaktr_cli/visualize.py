"""Pictures of artifacts: per-image panels and a per-class IoU bar chart (PIL only).

A panel row shows, left to right: the image, one heatmap per CAM class (jet-like colours over
the greyed image), then every label artifact given (seeds, predictions), then the ground truth,
each labelled, with a class legend in the dataset palette below.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from weaktr_cli.artifacts import ArtifactReader
from weaktr_cli.data.base import IGNORE_INDEX, SegmentationDataset
from weaktr_cli.data.images import voc_palette
from weaktr_cli.errors import WeakTrError

TILE = 160  # the longer side of each tile, in pixels
CAPTION = 14
IGNORE_COLOUR = (255, 255, 255)


@dataclass(frozen=True)
class Layer:
    """One artifact shown in the panel, under `title`."""

    title: str
    reader: ArtifactReader


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _fit(image: Image.Image) -> Image.Image:
    scale = TILE / max(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    resample = Image.Resampling.NEAREST if image.mode == "P" else Image.Resampling.BILINEAR
    return image.resize(size, resample)


def colour_labels(label: np.ndarray) -> Image.Image:
    """(H, W) class ids -> RGB image in the dataset palette (255 = white)."""
    palette = np.array(voc_palette(), dtype=np.uint8).reshape(-1, 3)
    palette[IGNORE_INDEX] = IGNORE_COLOUR
    return Image.fromarray(palette[label])


def heatmap(image: np.ndarray, cam: np.ndarray) -> Image.Image:
    """A CAM in [0, 1] over the greyed image: blue (0) -> green -> red (1)."""
    grey = image.mean(axis=2, keepdims=True) * 0.5
    r = np.clip(1.5 - np.abs(4 * cam - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * cam - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * cam - 1), 0, 1)
    colour = np.stack([r, g, b], axis=2) * 255
    return Image.fromarray((0.45 * grey + 0.55 * colour).astype(np.uint8))


def _captioned(tile: Image.Image, caption: str) -> Image.Image:
    canvas = Image.new("RGB", (TILE, TILE + CAPTION), (255, 255, 255))
    canvas.paste(tile.convert("RGB"), ((TILE - tile.size[0]) // 2, CAPTION))
    ImageDraw.Draw(canvas).text((2, 1), caption[:26], fill=(0, 0, 0), font=_font())
    return canvas


def panel_row(dataset: SegmentationDataset, image_id: str, layers: Sequence[Layer]) -> Image.Image:
    """One row of tiles for `image_id` (see the module docstring)."""
    image = dataset.load_image(image_id)
    names = dataset.class_names
    tiles = [_captioned(_fit(Image.fromarray(image)), image_id)]
    for layer in layers:
        if image_id not in layer.reader:
            raise WeakTrError(f"{layer.reader.path} has no entry for image {image_id!r}")
        if layer.reader.kind == "cams":
            record = layer.reader.read_cams(image_id)
            for class_id, cam in zip(record.class_ids, record.maps, strict=True):
                tiles.append(_captioned(_fit(heatmap(image, cam)),
                                        f"{layer.title}: {names[class_id]}"))
        else:
            tiles.append(_captioned(_fit(colour_labels(layer.reader.read_labels(image_id))),
                                    layer.title))
    mask = dataset.load_mask(image_id)
    if mask is not None:
        tiles.append(_captioned(_fit(colour_labels(mask)), "ground truth"))
    row = Image.new("RGB", (TILE * len(tiles), TILE + CAPTION), (255, 255, 255))
    for i, tile in enumerate(tiles):
        row.paste(tile, (i * TILE, 0))
    return row


def legend(class_names: Sequence[str], width: int) -> Image.Image:
    """Palette swatches with class names, wrapped to `width`."""
    palette = voc_palette()
    entries = [(i, n) for i, n in enumerate(class_names) if n] + [(IGNORE_INDEX, "ignore")]
    cell = 120
    per_row = max(1, width // cell)
    rows = (len(entries) + per_row - 1) // per_row
    image = Image.new("RGB", (width, rows * 16 + 4), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for k, (class_id, name) in enumerate(entries):
        x, y = (k % per_row) * cell + 2, (k // per_row) * 16 + 2
        colour = IGNORE_COLOUR if class_id == IGNORE_INDEX else tuple(
            palette[3 * class_id : 3 * class_id + 3])
        draw.rectangle([x, y, x + 12, y + 12], fill=colour, outline=(0, 0, 0))
        draw.text((x + 16, y), name[:16], fill=(0, 0, 0), font=_font())
    return image


def panel_sheet(dataset: SegmentationDataset, ids: Sequence[str], layers: Sequence[Layer],
                out_path: str | Path) -> Path:
    """Rows of panels for `ids` plus a legend, saved as one PNG."""
    if not ids:
        raise WeakTrError("no images to show")
    rows = [panel_row(dataset, image_id, layers) for image_id in ids]
    width = max(r.size[0] for r in rows)
    key = legend(dataset.class_names, width)
    sheet = Image.new("RGB", (width, sum(r.size[1] for r in rows) + key.size[1]), "white")
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.size[1]
    sheet.paste(key, (0, y))
    return _save(sheet, out_path)


def iou_chart(series: Mapping[str, Sequence[float | None]], class_names: Sequence[str],
              out_path: str | Path, title: str = "per-class IoU") -> Path:
    """Grouped horizontal bars: one group per class, one bar per series (e.g. CAM, seeds, model).

    series maps a label to per-class IoU in percent (None = class absent), indexed by class id.
    """
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    classes = [(i, n) for i, n in enumerate(class_names) if n]
    bar, gap, left, plot = 9, 8, 110, 360
    group = bar * len(series) + gap
    height = 40 + group * len(classes) + 16 * len(series)
    image = Image.new("RGB", (left + plot + 60, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), title, fill=(0, 0, 0), font=_font())
    for tick in range(0, 101, 25):
        x = left + plot * tick / 100
        draw.line([x, 24, x, 30 + group * len(classes)], fill=(220, 220, 220))
        draw.text((x - 6, 16), str(tick), fill=(90, 90, 90), font=_font())
    for row, (class_id, name) in enumerate(classes):
        y0 = 30 + row * group
        draw.text((4, y0 + 2), name[:16], fill=(0, 0, 0), font=_font())
        for k, values in enumerate(series.values()):
            value = values[class_id] if class_id < len(values) else None
            y = y0 + k * bar
            if value is None:
                continue
            draw.rectangle([left, y, left + plot * value / 100, y + bar - 2],
                           fill=palette[k % len(palette)])
            draw.text((left + plot * value / 100 + 3, y - 2), f"{value:.0f}", fill=(60, 60, 60),
                      font=_font())
    y = 34 + group * len(classes)
    for k, label in enumerate(series):
        draw.rectangle([left, y + 16 * k, left + 10, y + 16 * k + 10],
                       fill=palette[k % len(palette)])
        draw.text((left + 16, y + 16 * k), label, fill=(0, 0, 0), font=_font())
    return _save(image, out_path)


def _save(image: Image.Image, out_path: str | Path) -> Path:
    import io

    from weaktr_cli.io import atomic_write_bytes

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return atomic_write_bytes(out_path, buffer.getvalue())
