"""Reading and writing the image files datasets are made of (RGB photos, index label PNGs).

Every decode problem (missing, truncated or corrupt file) becomes a `WeakTrError` that names
the file, so a single bad JPEG in a 10k-image split gives one clear line, not a PIL traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from weaktr_cli.errors import WeakTrError

# PIL raises SyntaxError for some broken PNG chunks and DecompressionBombError (not an OSError)
# for absurd sizes; both are "this file cannot be read" to a user.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()  # decode now: truncation only shows up here
    except FileNotFoundError:
        raise WeakTrError(f"cannot read image {path}: file not found") from None
    except _DECODE_ERRORS as exc:
        raise WeakTrError(
            f"cannot read image {path}: {exc}",
            hint="the file is corrupt or truncated; re-extract it",
        ) from exc
    return img


def read_rgb(path: str | Path, *, exif_orientation: bool = False) -> np.ndarray:
    """Read an image as RGB: (H, W, 3) uint8, C-contiguous and writable.

    Grey, palette, CMYK and RGBA files are converted to RGB (alpha dropped); 16-bit grey files
    are scaled to 8 bits (not clipped to white). With `exif_orientation` the EXIF orientation
    tag is applied (the image as a photo viewer shows it: what a user's own photos need);
    without it the stored pixel grid is kept, matching the VOC/COCO tooling whose masks and
    polygons use that grid.
    """
    path = Path(path)
    img = _open(path)
    if exif_orientation:
        img = _exif_transposed(img, path)
    if img.mode in _WIDE_GREY_MODES:
        grey = _eight_bit_grey(img, path)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if img.mode != "RGB":
        img = img.convert("RGB")
    # np.array (not np.asarray) gives a writable copy; pydensecrf rejects read-only buffers.
    return np.ascontiguousarray(np.array(img, dtype=np.uint8))


def exif_orientation_of(path: str | Path) -> int:
    """The EXIF orientation tag of an image file (1 = as stored, 6 = rotate 90 clockwise, ...)."""
    img = _open(Path(path))
    return int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)


# PIL's modes for 16/32-bit grey pixels: converting them to RGB clips every value above 255,
# which turns a 16-bit photo white.
_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_EXIF_ORIENTATION = 0x0112


def _eight_bit_grey(img: Image.Image, path: Path) -> np.ndarray:
    """(H, W) uint8 from a 16-bit grey image: the top 8 of 16 bits (65535 -> 255)."""
    wide = np.array(img).astype(np.int64)
    if wide.size and (wide.min() < 0 or wide.max() > 65535):
        raise WeakTrError(
            f"cannot read image {path}: {img.mode} pixels outside 0..65535",
            hint="save the image as an 8-bit or 16-bit PNG or a JPEG",
        )
    return (wide >> 8).astype(np.uint8)


def _exif_transposed(img: Image.Image, path: Path) -> Image.Image:
    from PIL import ImageOps

    try:
        turned = ImageOps.exif_transpose(img)
    except _DECODE_ERRORS as exc:
        raise WeakTrError(
            f"cannot read image {path}: bad EXIF orientation ({exc})",
            hint="strip the EXIF data (e.g. exiftool -Orientation= FILE) or re-save the photo",
        ) from exc
    return img if turned is None else turned


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a label PNG as (H, W) uint8 class ids (255 = ignore), C-contiguous and writable.

    Palette ("P") images give their palette indices as-is (the VOC convention); grey ("L")
    images give their values. Colour (RGB) label images are rejected: their colours would have
    to be mapped back to ids through a palette we cannot guess.
    """
    path = Path(path)
    img = _open(path)
    if img.mode in ("P", "L"):
        arr = np.array(img, dtype=np.uint8)
    elif img.mode == "1":
        arr = np.array(img, dtype=np.uint8)  # bilevel: 0 / 1
    elif img.mode in ("I", "I;16", "I;16B", "I;16L"):
        wide = np.array(img)
        if wide.size and (wide.min() < 0 or wide.max() > 255):
            raise WeakTrError(
                f"label image {path} holds values up to {int(wide.max())}, beyond uint8",
                hint="class ids must be 0..254 with 255 = ignore; save labels as 8-bit PNGs",
            )
        arr = wide.astype(np.uint8)
    else:
        raise WeakTrError(
            f"label image {path} is a {img.mode} image, not an index (palette or grey) PNG",
            hint="label PNGs must store class ids per pixel (mode P or L); convert colour masks "
            "to ids first",
        )
    return np.ascontiguousarray(arr)


def voc_palette(n: int = 256) -> list[int]:
    """The standard PASCAL VOC colour map as a flat [r0, g0, b0, r1, ...] list of 3*n ints.

    Id 1 is (128, 0, 0), id 15 (person) is (192, 128, 128), id 255 is (224, 224, 192).
    """
    palette: list[int] = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            # Bits of the id are spread over the three channels, high bits first.
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.extend((r, g, b))
    return palette


def write_label_png(
    path: str | Path, label: np.ndarray, palette: Sequence[int] | None = None
) -> None:
    """Write an (H, W) uint8 label map as a palette PNG (pixel values = class ids).

    `palette` is a flat RGB list (at most 768 ints); default: `voc_palette()`. Parent folders are
    created.
    """
    path = Path(path)
    label = np.asarray(label)
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"label must be (H, W) uint8, got {label.shape} {label.dtype}")
    pal = list(voc_palette() if palette is None else palette)
    if len(pal) > 768 or len(pal) % 3:
        raise ValueError(f"palette must be a flat RGB list of at most 768 ints, got {len(pal)}")
    h, w = label.shape
    img = Image.frombytes("P", (w, h), np.ascontiguousarray(label).tobytes())
    img.putpalette(pal)
    _save(img, path)


def write_rgb(path: str | Path, img: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB image; the format follows the suffix (PNG is lossless)."""
    path = Path(path)
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {arr.shape} {arr.dtype}")
    pil = Image.fromarray(np.ascontiguousarray(arr))  # (H, W, 3) uint8 -> RGB
    _save(pil, path)


def _save(img: Image.Image, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() in (".jpg", ".jpeg"):
            img.save(path, quality=95)  # PIL's default 75 visibly degrades small test images
        else:
            img.save(path)
    except (OSError, ValueError) as exc:
        raise WeakTrError(f"cannot write image {path}: {exc}") from exc
