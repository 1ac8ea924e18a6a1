"""Pictures of artifacts: per-image panels and a per-class IoU bar chart (PIL only).

A panel row shows, left to right: the image, one heatmap per CAM class (jet-like colours over
the greyed image), then every label artifact given (seeds, predictions), then the ground truth,
each captioned (a caption cut to its tile ends in an ellipsis). Tiles share one height and keep
their image's aspect ratio, so rows have no gaps; the legend below names only the classes the
label maps show, flowed to the sheet's width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from weaktr_cli.artifacts import ArtifactReader, open_artifact
from weaktr_cli.data.base import IGNORE_INDEX, SegmentationDataset
from weaktr_cli.data.images import voc_palette
from weaktr_cli.errors import WeakTrError

TILE = 224  # the height of every tile; its width follows the image's aspect ratio
MAX_ASPECT = 2.0  # wider images are shrunk to TILE * MAX_ASPECT wide (a panorama stays readable)
MIN_WIDTH = 96  # narrow tiles are padded to this, so their captions stay readable
GAP = 4  # white pixels between tiles and rows
CAPTION = 16
IGNORE_COLOUR = (255, 255, 255)
ELLIPSIS = "\u2026"


@dataclass(frozen=True)
class Layer:
    """One artifact shown in the panel, under `title`."""

    title: str
    reader: ArtifactReader


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=12)


def shorten(text: str, width: float) -> str:
    """`text` cut to `width` pixels of the caption font, the cut marked by an ellipsis (a cut
    id must never read as another, real id)."""
    font = _font()
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + ELLIPSIS) > width:
        text = text[:-1]
    return text + ELLIPSIS


def _fit(image: Image.Image) -> Image.Image:
    """Scale to TILE pixels high (at most TILE * MAX_ASPECT wide), keeping the aspect ratio."""
    scale = min(TILE / image.size[1], TILE * MAX_ASPECT / image.size[0])
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
    width = max(tile.size[0], MIN_WIDTH)
    canvas = Image.new("RGB", (width, TILE + CAPTION), (255, 255, 255))
    canvas.paste(tile.convert("RGB"), ((width - tile.size[0]) // 2, CAPTION))
    ImageDraw.Draw(canvas).text((2, 1), shorten(caption, width - 4), fill=(0, 0, 0),
                                font=_font())
    return canvas


def _row(tiles: Sequence[Image.Image]) -> Image.Image:
    width = sum(t.size[0] for t in tiles) + GAP * (len(tiles) - 1)
    row = Image.new("RGB", (width, TILE + CAPTION), (255, 255, 255))
    x = 0
    for tile in tiles:
        row.paste(tile, (x, 0))
        x += tile.size[0] + GAP
    return row


def panel_row(dataset: SegmentationDataset, image_id: str, layers: Sequence[Layer]
              ) -> tuple[Image.Image, set[int]]:
    """One row of tiles for `image_id` (see the module docstring) and the class ids it shows."""
    image = dataset.load_image(image_id)
    names = dataset.class_names
    tiles = [_captioned(_fit(Image.fromarray(image)), image_id)]
    shown: set[int] = set()
    for layer in layers:
        if image_id not in layer.reader:
            raise WeakTrError(f"{layer.reader.path} has no entry for image {image_id!r}")
        if layer.reader.kind == "cams":
            record = layer.reader.read_cams(image_id)
            for class_id, cam in zip(record.class_ids, record.maps, strict=True):
                tiles.append(_captioned(_fit(heatmap(image, cam)),
                                        f"{layer.title}: {names[class_id]}"))
        else:
            label = layer.reader.read_labels(image_id)
            if label.shape != image.shape[:2]:
                # e.g. a mask made with the EXIF orientation applied, drawn on the stored grid
                raise WeakTrError(
                    f"{layer.reader.path}: the labels of {image_id!r} are {label.shape[1]}x"
                    f"{label.shape[0]}, the image is {image.shape[1]}x{image.shape[0]}",
                    hint="draw an artifact with the dataset (or image folder) it was made from",
                )
            shown.update(int(c) for c in np.unique(label))
            tiles.append(_captioned(_fit(colour_labels(label)), layer.title))
    mask = dataset.load_mask(image_id)
    if mask is not None:
        shown.update(int(c) for c in np.unique(mask))
        tiles.append(_captioned(_fit(colour_labels(mask)), "ground truth"))
    return _row(tiles), shown


def legend(class_names: Sequence[str], width: int, shown: set[int] | None = None
           ) -> Image.Image:
    """Palette swatches with the names of the classes in `shown` (default: all), in class-id
    order, flowed into lines of at most `width` pixels."""
    palette = voc_palette()
    entries = [(i, n) for i, n in enumerate(class_names)
               if n and (shown is None or i in shown)]
    if shown is None or IGNORE_INDEX in shown:
        entries.append((IGNORE_INDEX, "ignore"))
    font = _font()
    cells = []
    for class_id, name in entries:
        text = shorten(name, width - 24)
        cells.append((class_id, text, 16 + round(font.getlength(text)) + 12))
    lines: list[list[tuple[int, str, int]]] = [[]]
    used = 0
    for cell in cells:
        if lines[-1] and used + cell[2] > width:
            lines.append([])
            used = 0
        lines[-1].append(cell)
        used += cell[2]
    image = Image.new("RGB", (width, len(lines) * 18 + 4), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for row, line in enumerate(lines):
        x, y = 2, row * 18 + 3
        for class_id, text, cell_width in line:
            colour = IGNORE_COLOUR if class_id == IGNORE_INDEX else tuple(
                palette[3 * class_id : 3 * class_id + 3])
            draw.rectangle([x, y, x + 12, y + 12], fill=colour, outline=(0, 0, 0))
            draw.text((x + 16, y), text, fill=(0, 0, 0), font=font)
            x += cell_width
    return image


def panel_sheet(dataset: SegmentationDataset, ids: Sequence[str], layers: Sequence[Layer],
                out_path: str | Path) -> Path:
    """Rows of panels for `ids` plus a legend of the classes they show, saved as one PNG."""
    if not ids:
        raise WeakTrError("no images to show")
    rows, shown = [], set()
    for image_id in ids:
        row, classes = panel_row(dataset, image_id, layers)
        rows.append(row)
        shown |= classes
    width = max(r.size[0] for r in rows)
    # CAM tiles name their class in the caption: only label colours need the legend.
    key = legend(dataset.class_names, width, shown) if shown else Image.new("RGB", (width, 0))
    height = sum(r.size[1] + GAP for r in rows) + key.size[1]
    sheet = Image.new("RGB", (width, height), "white")
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.size[1] + GAP
    sheet.paste(key, (0, y))
    return _save(sheet, out_path)


def show_artifacts(artifacts: Sequence[Path], out_path: str | Path, *,
                   ids: Sequence[str] | None = None, n: int = 8, data: str | None = None,
                   data_root: Path | None = None) -> tuple[Path, list[str]]:
    """`panel_sheet` of artifact files, drawn in the order given: CAM layers are titled "CAM",
    label layers by their file's stem. The images come from the dataset the first artifact
    records (`data`, `data_root` override it); `ids` default to its first `n`.

    Returns the PNG's path and the ids drawn.
    """
    from weaktr_cli.data import open_artifact_dataset

    with ExitStack() as stack:
        readers = [stack.enter_context(open_artifact(p)) for p in artifacts]
        dataset = open_artifact_dataset(readers[0].meta, data=data, root=data_root)
        shown = list(ids) if ids else readers[0].ids[:n]
        layers = [Layer(p.stem if r.kind == "labels" else "CAM", r)
                  for p, r in zip(artifacts, readers, strict=True)]
        return panel_sheet(dataset, shown, layers, out_path), shown


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
        draw.text((4, y0 + 2), shorten(name, left - 8), fill=(0, 0, 0), font=_font())
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

    from weaktr_cli.files import atomic_write_bytes

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return atomic_write_bytes(out_path, buffer.getvalue())
