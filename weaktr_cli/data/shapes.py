"""`shapes`: the built-in, deterministic synthetic dataset (weaktr's default dataset).

Each image is 1..`max_objects` solid shapes on a textured background. A class is a
(colour family, shape) pair such as "red-square", so telling classes apart needs both the
colour and the outline of the object: a model cannot classify from colour statistics alone and
cannot classify from an outline detector alone either.

Generated once from `ShapesConfig` into a cache folder in the PASCAL VOC layout, so the same
`VocDataset` loader reads it::

    <cache>/shapes-<fingerprint>/VOC2012/
        JPEGImages/shapes_train_000123.png        RGB, lossless
        SegmentationClass/shapes_train_000123.png palette PNG (PASCAL palette), 255 = ignore
        ImageSets/Segmentation/{train,val,test}.txt
        weaktr_dataset.json                        {"name": "shapes", "class_names", "config", ...}

Design (what a sample looks like and why):
- Background: one of smooth value noise, soft stripes or a linear gradient between two
  *desaturated* colours (saturation <= 0.35) of any hue, plus per-pixel noise. Background hue is
  drawn independently of the objects, so it never gives the class away.
- Objects: saturated colours (saturation >= 0.6), hue jittered +-10 degrees around the family's
  hue, random value, a linear shading ramp across the object and the same per-pixel noise; random
  rotation, aspect ratio 0.8-1.25 and size. Size is the *equivalent diameter* (the diameter of the
  disc of equal area) as a fraction of the image side, so a triangle and a circle of the same size
  cover the same number of pixels. Objects are kept whole inside the image.
- Occlusion: each object after the first is, with probability `occlusion_prob`, placed so that
  it covers part of an earlier one (every object keeps >= `min_visible` of its area visible);
  otherwise it is placed with a gap of at least 2 px from the others.
- Ground truth is the exact rasterised shape (pixel centre inside the shape; no anti-aliasing, so
  the image and the mask agree pixel for pixel). Like VOC, a thin band of ignore pixels (255)
  outlines each object: the `ignore_border` pixels just *outside* each visible object region (on
  the background, or on the occluded object beneath it). It keeps evaluation from hinging on
  single boundary pixels after up-sampling and makes every consumer exercise the 255 path it
  needs for VOC. Objects never lose pixels of their own to the band, so tiny objects stay scored.

Splits: `train` (the weak labels are learnt from it), `val` (pixel labels may choose settings)
and a held-out `test` split that nothing is ever chosen on: `weaktr pipeline` reports the final
model on it. Each split is its own seed stream (below), so adding `test` left every train and
val image byte-identical.

Determinism: image `i` of a split is drawn from its own generator
`np.random.default_rng([seed, split_code, i])`, so it does not depend on the dataset size and
generation could run in parallel. Only integer draws and uniform floats are used, and per-pixel
arithmetic is limited to +, -, *, /, sqrt and floor (all exactly rounded in IEEE 754), with no
libm transcendental functions on arrays (their last bit differs between platforms and SIMD
paths), so the pixels are bit-identical on any machine. PNG bytes are identical given the same
zlib/Pillow.
"""

from __future__ import annotations

import colorsys
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from weaktr_cli.data.base import IGNORE_INDEX
from weaktr_cli.data.images import write_label_png, write_rgb
from weaktr_cli.errors import WeakTrError

if TYPE_CHECKING:
    from weaktr_cli.data.base import SegmentationDataset

#: Bump whenever a change to this module changes any generated pixel: it is part of the cache
#: fingerprint, so stale caches are never reused.
GENERATOR_VERSION = 2

#: Shapes in the order classes are enumerated (a K-class dataset uses the first few).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
#: Colour families and their hue centres in degrees; adjacent centres are >= 55 degrees apart
#: so that +-10 degrees of jitter never makes two families touch.
FAMILIES: tuple[tuple[str, float], ...] = (
    ("red", 0.0),
    ("blue", 225.0),
    ("green", 120.0),
    ("yellow", 55.0),
    ("magenta", 300.0),
)
MAX_CLASSES = len(SHAPES) * len(FAMILIES)
SPLITS = ("train", "val", "test")
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_INFO_FILE = "weaktr_dataset.json"  # written last: a matching one marks a finished dataset

_HUE_JITTER = 10.0  # degrees
_OBJ_SAT = (0.6, 1.0)
_OBJ_VAL = (0.6, 1.0)
_BG_SAT = (0.0, 0.35)
_BG_VAL = (0.2, 0.95)
_SHADING = 0.2  # objects' brightness varies by up to +-20 % across them
_ASPECT = (0.8, 1.25)
_GAP = 2  # px between objects not meant to touch (at least ignore_border + 1)
_MAX_TRIES = 40


@dataclass(frozen=True)
class ShapesConfig:
    """Everything that determines the generated dataset (and hence its cache fingerprint).

    Sizes are equivalent diameters as fractions of `image_size`. `num_classes` (K, foreground
    only) is split into colour families x shapes: `num_families` families (default: as evenly as
    possible, families first: K=6 -> 3 families x 2 shapes) and ceil(K / families) shapes; at
    most `MAX_CLASSES` (30).
    """

    seed: int = 0
    num_train: int = 2000
    num_val: int = 500
    num_test: int = 500
    image_size: int = 96
    num_classes: int = 6
    num_families: int | None = None
    max_objects: int = 3
    min_size: float = 0.2
    max_size: float = 0.45
    occlusion_prob: float = 0.3
    min_visible: float = 0.6
    ignore_border: int = 1
    pixel_noise: int = 6

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> WeakTrError:
            return WeakTrError(f"invalid shapes setting {field}={getattr(self, field)!r}: {why}")

        counts = ("num_train", "num_val", "num_test")
        for name in ("seed", *counts, "image_size", "num_classes", "max_objects"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise bad(name, "must be an integer")
        if self.seed < 0:
            raise bad("seed", "must be >= 0")
        if min(getattr(self, c) for c in counts) < 0 or self.num_train + self.num_val == 0:
            raise bad("num_train", "split sizes must be >= 0 and train and val not both 0")
        for name in counts:
            if getattr(self, name) > 999_999:
                raise bad(name, "at most 999999 images per split")
        if not 24 <= self.image_size <= 1024:
            raise bad("image_size", "must be between 24 and 1024 pixels")
        if not 1 <= self.num_classes <= MAX_CLASSES:
            raise bad("num_classes", f"must be between 1 and {MAX_CLASSES}")
        if self.num_families is not None and not (
            isinstance(self.num_families, int)
            and 1 <= self.num_families <= min(len(FAMILIES), self.num_classes)
            and -(-self.num_classes // self.num_families) <= len(SHAPES)
        ):
            raise bad(
                "num_families",
                f"need 1..{len(FAMILIES)} families, at most num_classes, and at most "
                f"{len(SHAPES)} shapes per family",
            )
        if not 1 <= self.max_objects <= 6:
            raise bad("max_objects", "must be between 1 and 6")
        if not 0.05 <= self.min_size <= self.max_size <= 0.6:
            raise bad("min_size", "need 0.05 <= min_size <= max_size <= 0.6")
        if not 0.0 <= self.occlusion_prob <= 1.0:
            raise bad("occlusion_prob", "must be in [0, 1]")
        if not 0.2 <= self.min_visible <= 1.0:
            raise bad("min_visible", "must be in [0.2, 1]")
        if not 0 <= self.ignore_border <= 3:
            raise bad("ignore_border", "must be 0..3 pixels")
        if not 0 <= self.pixel_noise <= 64:
            raise bad("pixel_noise", "must be 0..64")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """12 hex digits identifying the settings and `GENERATOR_VERSION`."""
        payload = json.dumps(
            {"config": self.to_dict(), "generator_version": GENERATOR_VERSION}, sort_keys=True
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]

    def split_size(self, split: str) -> int:
        """Number of images of `split` ("train", "val" or "test")."""
        _check_split(split)
        sizes = {"train": self.num_train, "val": self.num_val, "test": self.num_test}
        return sizes[split]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise WeakTrError(f"shapes has no split {split!r}", hint=f"use one of {', '.join(SPLITS)}")


def _grid(config: ShapesConfig) -> tuple[int, int]:
    """(families, shapes) used for K classes: by default near-square with families >= shapes.

    Families first because a tiny ViT from scratch learns colour within minutes but outline
    slowly (measured with benchmarks/shapes_probe.py, K=6, 270 steps: 3 families x 2 shapes gave
    CAM mIoU 68 / mAP 66, 2 families x 3 shapes 59 / 55); any K > families still needs shape.
    """
    k = config.num_classes
    n_families = config.num_families
    if n_families is None:
        n_families = min(len(FAMILIES), math.isqrt(k - 1) + 1)  # ceil(sqrt(K))
    return n_families, -(-k // n_families)


def class_table(config: ShapesConfig) -> list[tuple[str, int, str]]:
    """(family, hue_index, shape) for foreground class ids 1..K, in id order."""
    n_families, n_shapes = _grid(config)
    table = [(FAMILIES[f][0], f, SHAPES[s]) for f in range(n_families) for s in range(n_shapes)]
    return table[: config.num_classes]


def class_names(config: ShapesConfig) -> tuple[str, ...]:
    """("background", "red-circle", "red-square", ...): K + 1 names, index = class id."""
    return ("background", *(f"{fam}-{shape}" for fam, _, shape in class_table(config)))


def image_id(split: str, index: int) -> str:
    """The id of image `index` of `split`, e.g. "shapes_train_000123"."""
    return f"shapes_{split}_{index:06d}"


# ----------------------------------------------------------------------------- geometry


def _polygon(vertices: list[tuple[float, float]]) -> np.ndarray:
    """Vertices scaled to unit equivalent diameter (area pi/4), as a float64 (n, 2) array."""
    n = len(vertices)
    # shoelace formula; fsum is exactly rounded, so the scale is the same on every platform
    area = 0.5 * abs(
        math.fsum(
            vertices[i][0] * vertices[(i + 1) % n][1] - vertices[(i + 1) % n][0] * vertices[i][1]
            for i in range(n)
        )
    )
    return np.array(vertices, dtype=np.float64) * math.sqrt((math.pi / 4) / area)


def _star_vertices() -> list[tuple[float, float]]:
    # cos/sin of multiples of 18 degrees in closed form (sqrt only): exactly reproducible.
    s5 = math.sqrt(5.0)
    c18, s18 = math.sqrt(10 + 2 * s5) / 4, (s5 - 1) / 4
    c54, s54 = math.sqrt(10 - 2 * s5) / 4, (s5 + 1) / 4
    outer = [(0.0, 1.0), (-c18, s18), (-c54, -s54), (c54, -s54), (c18, s18)]  # 90, 162, ...
    inner = [(-c54, s54), (-c18, -s18), (0.0, -1.0), (c18, -s18), (c54, s54)]  # 126, 198, ...
    ratio = 0.5  # fatter than a regular pentagram (0.382): its arms stay several px wide
    verts: list[tuple[float, float]] = []
    for (ox, oy), (ix, iy) in zip(outer, inner, strict=True):
        verts += [(ox, oy), (ix * ratio, iy * ratio)]
    return verts


_R3 = math.sqrt(3.0)
_POLYGONS: dict[str, np.ndarray] = {
    "square": _polygon([(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]),
    "triangle": _polygon([(0.0, 1.0), (-_R3 / 2, -0.5), (_R3 / 2, -0.5)]),
    "star": _polygon(_star_vertices()),
    "cross": _polygon(
        [(1, 3), (1, 1), (3, 1), (3, -1), (1, -1), (1, -3),
         (-1, -3), (-1, -1), (-3, -1), (-3, 1), (-1, 1), (-1, 3)]
    ),
}  # fmt: skip
_RING_OUTER = 1 / _R3  # outer radius for area pi/4 with the hole at half the radius
_CIRCUMRADIUS: dict[str, float] = {
    "circle": 0.5,
    "ring": _RING_OUTER,
    **{k: max(math.sqrt(x * x + y * y) for x, y in v.tolist()) for k, v in _POLYGONS.items()},
}


def _inside_polygon(x: np.ndarray, y: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd rule: bool array, True where (x, y) lies inside the polygon."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(verts)
    for i in range(n):
        x1, y1 = float(verts[i, 0]), float(verts[i, 1])
        x2, y2 = float(verts[i - 1, 0]), float(verts[i - 1, 1])
        if y1 == y2:
            continue  # a horizontal edge is never crossed by a horizontal ray
        crosses = (y1 > y) != (y2 > y)
        x_cross = x1 + (y - y1) * ((x2 - x1) / (y2 - y1))
        inside ^= crosses & (x < x_cross)
    return inside


def _inside_shape(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x, y: local coordinates in units of the equivalent diameter."""
    inside: np.ndarray
    if shape == "circle":
        inside = x * x + y * y <= 0.25
    elif shape == "ring":
        r2 = x * x + y * y
        inside = (r2 <= _RING_OUTER**2) & (r2 >= (_RING_OUTER / 2) ** 2)
    else:
        inside = _inside_polygon(x, y, _POLYGONS[shape])
    return inside


@dataclass(frozen=True)
class ShapeObject:
    """One placed object. Geometry in pixels; `area` counts its rasterised pixels."""

    class_id: int
    shape: str
    family: str
    center: tuple[float, float]  # (x, y), pixel centres are at i + 0.5
    size: float  # equivalent diameter in pixels
    area: int
    visible: int  # pixels where it is on top (before the ignore band)


@dataclass(frozen=True)
class Scene:
    """A rendered sample. image (H, W, 3) uint8; mask (H, W) uint8 class ids with 255 = ignore;
    instances (H, W) int32: 0 background, j = objects[j - 1] (drawn in that order)."""

    image: np.ndarray
    mask: np.ndarray
    instances: np.ndarray
    objects: tuple[ShapeObject, ...]


def _unit_vector(rng: np.random.Generator) -> tuple[float, float]:
    """A uniformly random direction without trigonometry (rejection from the unit disc)."""
    while True:
        a, b = rng.uniform(-1.0, 1.0, size=2)
        r2 = float(a * a + b * b)
        if 1e-4 < r2 <= 1.0:
            r = math.sqrt(r2)
            return float(a) / r, float(b) / r


def _rasterize(
    shape: str,
    center: tuple[float, float],
    size: float,
    rot: tuple[float, float],
    aspect: float,
    image_size: int,
) -> np.ndarray:
    """(H, W) bool mask of one shape: True where the pixel centre is inside it."""
    cx, cy = center
    reach = size * _CIRCUMRADIUS[shape] * max(aspect, 1 / aspect) + 1
    x0, x1 = max(0, math.floor(cx - reach)), min(image_size, math.ceil(cx + reach) + 1)
    y0, y1 = max(0, math.floor(cy - reach)), min(image_size, math.ceil(cy + reach) + 1)
    dx = (np.arange(x0, x1, dtype=np.float64) + 0.5 - cx)[None, :]
    dy = (np.arange(y0, y1, dtype=np.float64) + 0.5 - cy)[:, None]
    u, v = rot
    # rotate into the shape frame, then undo the aspect stretch (x by aspect, y by 1/aspect)
    lx = (u * dx + v * dy) / (size * aspect)
    ly = (u * dy - v * dx) * (aspect / size)
    out = np.zeros((image_size, image_size), dtype=bool)
    out[y0:y1, x0:x1] = _inside_shape(shape, lx, ly)
    return out


def _dilate(a: np.ndarray, steps: int) -> np.ndarray:
    """Grey dilation with the 4-neighbourhood (cross), `steps` times; same dtype and shape."""
    out = a.copy()
    for _ in range(steps):
        prev = out.copy()
        np.maximum(out[1:], prev[:-1], out=out[1:])
        np.maximum(out[:-1], prev[1:], out=out[:-1])
        np.maximum(out[:, 1:], prev[:, :-1], out=out[:, 1:])
        np.maximum(out[:, :-1], prev[:, 1:], out=out[:, :-1])
    return out


def _ignore_band(instances: np.ndarray, width: int) -> np.ndarray:
    """Pixels within `width` (4-connected steps) of an object drawn above them."""
    if width == 0:
        return np.zeros(instances.shape, dtype=bool)
    return _dilate(instances, width) > instances


# ----------------------------------------------------------------------------- appearance


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float64)


def _background_colour(rng: np.random.Generator) -> np.ndarray:
    h, s, v = rng.random(), rng.uniform(*_BG_SAT), rng.uniform(*_BG_VAL)
    return _hsv(h, s, v)


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear up-sampling of a (g, g) grid to (size, size), sample points at pixel centres."""
    g = grid.shape[0]
    p = (np.arange(size, dtype=np.float64) + 0.5) * ((g - 1) / size)
    i0 = np.minimum(np.floor(p).astype(np.int64), g - 2)
    f = p - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]  # (size, g)
    out: np.ndarray = rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]
    return out


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(S, S, 3) float64 RGB in [0, 1]: noise, stripes or a gradient between two colours."""
    c1, c2 = _background_colour(rng), _background_colour(rng)
    kind = int(rng.integers(3))
    t = (np.arange(size, dtype=np.float64) + 0.5) / size
    if kind == 0:  # smooth value noise
        cells = int(rng.integers(3, 9))
        w = _upsample(rng.random((cells, cells)), size)
    else:
        ux, uy = _unit_vector(rng)
        proj = t[None, :] * ux + t[:, None] * uy  # (S, S), in [-sqrt2, sqrt2]
        if kind == 1:  # soft stripes: a sharpened triangle wave (no sin: platform-exact)
            phase = proj * rng.uniform(2.0, 8.0) + rng.random()
            tri = 2 * np.abs(phase - np.floor(phase) - 0.5)
            w = np.clip((tri - 0.5) * rng.uniform(1.0, 4.0) + 0.5, 0.0, 1.0)
        else:  # linear gradient over the whole image
            lo, hi = float(proj.min()), float(proj.max())
            w = (proj - lo) / max(hi - lo, 1e-9)
    rgb: np.ndarray = c1[None, None, :] * (1 - w)[:, :, None] + c2[None, None, :] * w[:, :, None]
    return rgb


def _object_colour(rng: np.random.Generator, hue_deg: float) -> np.ndarray:
    h = (hue_deg + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) / 360.0
    return _hsv(h, rng.uniform(*_OBJ_SAT), rng.uniform(*_OBJ_VAL))


# ----------------------------------------------------------------------------- sampling


def _sample_rng(config: ShapesConfig, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, _SPLIT_CODES[split], index])


def render_scene(config: ShapesConfig, split: str, index: int) -> Scene:
    """Render image `index` of `split` with its masks and object list (no files touched)."""
    _check_split(split)
    if not 0 <= index < config.split_size(split):
        raise WeakTrError(f"shapes {split} has {config.split_size(split)} images, no index {index}")
    rng = _sample_rng(config, split, index)
    size = config.image_size
    table = class_table(config)
    img = _background(rng, size)
    instances = np.zeros((size, size), dtype=np.int32)
    objects: list[ShapeObject] = []
    masks: list[np.ndarray] = []
    n_objects = 1 + int(rng.integers(config.max_objects))
    for j in range(n_objects):
        cls = int(rng.integers(config.num_classes))
        family, hue_index, shape = table[cls]
        occlude = j > 0 and rng.random() < config.occlusion_prob
        diameter = rng.uniform(config.min_size, config.max_size) * size
        rot = _unit_vector(rng)
        aspect = rng.uniform(*_ASPECT)
        reach = _CIRCUMRADIUS[shape] * max(aspect, 1 / aspect)
        diameter = min(diameter, (size / 2 - 1) / reach)  # the whole shape fits in the image
        colour = _object_colour(rng, FAMILIES[hue_index][1])
        shade_dir = _unit_vector(rng)
        shade = rng.uniform(-_SHADING, _SHADING)
        placed = None
        for attempt in range(_MAX_TRIES):
            if attempt and attempt % 10 == 0:
                diameter *= 0.85  # crowded: shrink and try again
            r = diameter * reach
            center = (float(rng.uniform(r, size - r)), float(rng.uniform(r, size - r)))
            m = _rasterize(shape, center, diameter, rot, aspect, size)
            if not m.any():
                continue
            if _acceptable(m, instances, objects, masks, occlude, config):
                placed = (center, m)
                break
        if placed is None:
            if occlude:  # no valid occluding spot: a separate object is still a fine sample
                continue
            break
        center, m = placed
        masks.append(m)
        instances[m] = len(masks)
        objects.append(
            ShapeObject(cls + 1, shape, family, center, float(diameter), int(m.sum()), 0)
        )
        # colour ramp across the object along shade_dir, +-shade at its extent
        ys, xs = np.nonzero(m)
        proj = (xs + 0.5 - center[0]) * shade_dir[0] + (ys + 0.5 - center[1]) * shade_dir[1]
        ramp = 1 + proj * (shade / (diameter * reach))
        img[ys, xs] = np.clip(colour[None, :] * ramp[:, None], 0.0, 1.0)

    objects = [
        dataclasses.replace(o, visible=int((instances == k + 1).sum()))
        for k, o in enumerate(objects)
    ]
    class_of = np.array([0] + [o.class_id for o in objects], dtype=np.uint8)
    mask = class_of[instances]
    mask[_ignore_band(instances, config.ignore_border)] = IGNORE_INDEX
    noise = rng.integers(-config.pixel_noise, config.pixel_noise + 1, size=(size, size, 3))
    pixels = np.rint(img * 255.0).astype(np.int64) + noise
    image = np.clip(pixels, 0, 255).astype(np.uint8)
    return Scene(image, mask, instances, tuple(objects))


def _acceptable(
    m: np.ndarray,
    instances: np.ndarray,
    objects: list[ShapeObject],
    masks: list[np.ndarray],
    occlude: bool,
    config: ShapesConfig,
) -> bool:
    """Does placing mask `m` on top keep the scene valid (and occlude iff asked)?"""
    if not objects:
        return True
    taken = instances > 0
    if not occlude:
        gap = max(_GAP, config.ignore_border + 1)  # bands of separate objects never overlap
        return not (_dilate(taken, gap) & m).any()
    if not (taken & m).any():
        return False
    trial = instances.copy()
    trial[m] = len(masks) + 1
    band = _ignore_band(trial, config.ignore_border)
    for k, obj_mask in enumerate(masks):
        kept = int(((trial == k + 1) & ~band).sum())
        if kept < config.min_visible * obj_mask.sum():
            return False
    return True


def render_sample(config: ShapesConfig, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` of `split`: ((H, W, 3) uint8 RGB, (H, W) uint8 class ids, 255 = ignore)."""
    scene = render_scene(config, split, index)
    return scene.image, scene.mask


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """$WEAKTR_CACHE, else ~/.cache/weaktr."""
    env = os.environ.get("WEAKTR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "weaktr"


def dataset_dir(config: ShapesConfig, cache_dir: str | Path | None = None) -> Path:
    """Where `ensure_shapes` puts the VOC2012 folder of `config` (it may not exist yet)."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / f"shapes-{config.fingerprint()}" / "VOC2012"


def _read_info(voc: Path) -> dict[str, Any]:
    """The parsed weaktr_dataset.json of `voc`, or {} when missing or unreadable."""
    try:
        info = json.loads((voc / _INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _is_complete(voc: Path, config: ShapesConfig) -> bool:
    # weaktr_dataset.json is written last, so a matching one means every file is there
    return _read_info(voc).get("fingerprint") == config.fingerprint()


def _write_dataset(
    voc: Path, config: ShapesConfig, progress: Callable[[int, int], None] | None
) -> None:
    total = config.num_train + config.num_val + config.num_test
    done = 0
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    for split in SPLITS:
        ids = []
        for index in range(config.split_size(split)):
            image, mask = render_sample(config, split, index)
            name = image_id(split, index)
            write_rgb(voc / "JPEGImages" / f"{name}.png", image)
            write_label_png(voc / "SegmentationClass" / f"{name}.png", mask)
            ids.append(name)
            done += 1
            if progress is not None:
                progress(done, total)
        (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    info = {
        "name": "shapes",
        "class_names": list(class_names(config)),
        "config": config.to_dict(),
        "fingerprint": config.fingerprint(),
        "generator_version": GENERATOR_VERSION,
    }
    (voc / _INFO_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def ensure_shapes(
    config: ShapesConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Generate the dataset of `config` unless cached; returns its VOC2012 folder.

    Generation happens in a private temporary folder next to the target that is renamed into
    place at the end, so an interrupted run never leaves a half dataset and concurrent runs do
    not collide (the loser of the rename race discards its copy). `progress(done, total)` is
    called after each image.
    """
    config = config or ShapesConfig()
    voc = dataset_dir(config, cache_dir)
    target = voc.parent
    if _is_complete(voc, config):
        return voc
    if target.exists():
        raise WeakTrError(
            f"{target} exists but is not a complete shapes dataset",
            hint="delete that folder; it will be generated again",
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(
            tempfile.mkdtemp(prefix=f".{target.name}-", suffix=".partial", dir=target.parent)
        )
    except OSError as exc:
        raise WeakTrError(
            f"cannot create the shapes cache in {target.parent}: {exc}",
            hint="set WEAKTR_CACHE to a writable folder",
        ) from exc
    try:
        _write_dataset(tmp / "VOC2012", config, progress)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(voc, config):  # not a lost race: a real failure
                raise
    except OSError as exc:
        raise WeakTrError(
            f"cannot write the shapes dataset to {target}: {exc}",
            hint="check free space and permissions, or set WEAKTR_CACHE",
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return voc


def open_shapes(
    split: str, root: str | Path | None = None, config: ShapesConfig | None = None
) -> SegmentationDataset:
    """Split `split` ("train", "val" or "test", or a list file of their image ids) of the shapes
    dataset, generated on first use.

    `root` is the cache folder (default: `default_cache_dir()`), or a generated shapes folder
    (`shapes-<fingerprint>` or its VOC2012) to open as-is when `config` is None.
    Image-level labels come from the masks.

    Only the default cache, or an explicit `config`, generates: a `root` given without `config`
    must already hold a shapes dataset, so a mistyped --data-root is an error instead of a new
    52 MB dataset in the wrong place (`weaktr data shapes --out DIR` generates one on purpose).
    """
    from weaktr_cli.data.voc import VocDataset, is_list_file_path

    if not is_list_file_path(split):
        _check_split(split)
    voc = find_shapes(root) if root is not None and config is None else None
    if voc is None:
        voc = ensure_shapes(config or ShapesConfig(), cache_dir=root)
    return VocDataset(voc, split, label_source="masks", name="shapes")


def find_shapes(root: str | Path) -> Path:
    """The VOC2012 folder of the shapes dataset at `root`, without generating anything.

    `root` is a generated folder (`shapes-<fingerprint>`, its VOC2012) or a cache folder that
    holds the default dataset.
    """
    path = Path(root).expanduser()
    if not path.is_dir():
        raise WeakTrError(
            f"no shapes dataset at {path}: the folder does not exist",
            hint="check --data-root; generate one there with `weaktr data shapes --out DIR`, or "
            "omit --data-root for the built-in dataset",
        )
    for cand in (path, path / "VOC2012"):
        if _read_info(cand).get("name") == "shapes":
            return cand
    default = dataset_dir(ShapesConfig(), path)
    if _is_complete(default, ShapesConfig()):
        return default
    raise WeakTrError(
        f"no shapes dataset at {path} (no weaktr_dataset.json naming 'shapes', nor a cached "
        f"{default.parent.name}/ in it)",
        hint="pass the folder `weaktr data shapes` printed; generate one with `weaktr data "
        "shapes --out DIR`, or omit --data-root for the built-in dataset",
    )
