"""Dense CRF (Krähenbühl & Koltun) through pydensecrf, with WeakTr's parameter presets.

Everything here works in a compact label space: index 0 is the background plane and 1..K are
the classes present in one image, so a 2-class image costs a 3-label CRF, not a 21- or 91-label
one. Mapping compact indices back to dataset class ids is the caller's job (see `seeds.py`).

pydensecrf is imported lazily: `import weaktr_cli.dense_crf` works without it, and the first
CRF call (or `import_densecrf()`) raises one clear `WeakTrError` when it is missing or broken.

`label_from_probs` turns class probabilities into a label map, CRF-refined on request: the
last step of both predictors (`weaktr_cli.predict`, `weaktr_cli.onnx_infer`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from weaktr_cli.errors import WeakTrError

_INSTALL_HINT = (
    "pip install pydensecrf2 (the maintained fork; pydensecrf 1.0rc3 does not build on Cython 3)"
)


@dataclass(frozen=True)
class CrfParams:
    """Parameters of one dense CRF run (unary confidence, iterations, two pairwise kernels).

    `gt_prob` is the probability the hard-label unary gives the given label (the other labels
    share the rest); it is unused by the soft (probability) unary. Override single fields with
    `dataclasses.replace(get_preset("voc"), iterations=5)`.
    """

    gt_prob: float = 0.7
    iterations: int = 10
    gaussian_sxy: float = 4.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 83.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 3.0

    def __post_init__(self) -> None:
        if not 0.0 < self.gt_prob < 1.0:
            raise WeakTrError(f"CRF gt_prob must be in (0, 1), got {self.gt_prob}")
        if int(self.iterations) != self.iterations or self.iterations < 1:
            raise WeakTrError(f"CRF iterations must be a positive integer, got {self.iterations}")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise WeakTrError(f"CRF {name} must be a positive number, got {value}")
        for name in ("gaussian_compat", "bilateral_compat"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise WeakTrError(f"CRF {name} must be a non-negative number, got {value}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the fields (for provenance records)."""
        return dataclasses.asdict(self)


#: Named parameter sets (docs/method.md): seed CRF on hard CAM labels for VOC and COCO, and the
#: test-time VOC and COCO CRFs on segmentation probabilities (Phase 4 inference).
PRESETS: dict[str, CrfParams] = {
    "voc": CrfParams(
        gt_prob=0.7,
        iterations=10,
        gaussian_sxy=4.0,
        gaussian_compat=3.0,
        bilateral_sxy=83.0,
        bilateral_srgb=5.0,
        bilateral_compat=3.0,
    ),
    "coco": CrfParams(
        gt_prob=0.7,
        iterations=10,
        gaussian_sxy=3.0,
        gaussian_compat=3.0,
        bilateral_sxy=50.0,
        bilateral_srgb=5.0,
        bilateral_compat=10.0,
    ),
    "voc-test": CrfParams(
        gt_prob=0.7,
        iterations=10,
        gaussian_sxy=3.0,
        gaussian_compat=3.0,
        bilateral_sxy=83.0,
        bilateral_srgb=5.0,
        bilateral_compat=3.0,
    ),
    # The reference's COCO test-time CRF (hustvl/WeakTr 0ff9d9a
    # OnlineRetraining/segm/eval/densecrf.py:63-64).
    "coco-test": CrfParams(
        gt_prob=0.7,
        iterations=10,
        gaussian_sxy=1.0,
        gaussian_compat=3.0,
        bilateral_sxy=67.0,
        bilateral_srgb=3.0,
        bilateral_compat=4.0,
    ),
}


def get_preset(name: str) -> CrfParams:
    """The preset called `name` ("voc", "coco", "voc-test", "coco-test")."""
    try:
        return PRESETS[name]
    except KeyError:
        raise WeakTrError(
            f"unknown CRF preset {name!r}", hint=f"use one of {', '.join(PRESETS)}"
        ) from None


def import_densecrf() -> ModuleType:
    """Import and return `pydensecrf.densecrf` (and make sure `pydensecrf.utils` loads too)."""
    try:
        import pydensecrf.densecrf
        import pydensecrf.utils  # the unary helpers used below
    # A wheel built against another numpy can fail with ValueError/AttributeError, not only
    # ImportError; to a user every one of them means "the CRF library is unusable".
    except Exception as exc:
        raise WeakTrError(f"pydensecrf is not importable: {exc}", hint=_INSTALL_HINT) from exc
    densecrf: ModuleType = pydensecrf.densecrf
    return densecrf


def _utils() -> ModuleType:
    import_densecrf()
    import pydensecrf.utils

    utils: ModuleType = pydensecrf.utils
    return utils


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    # pydensecrf rejects read-only buffers (np.asarray of a PIL image) and needs C order.
    return np.array(image, dtype=np.uint8, order="C", copy=True)


def crf_posterior(image: np.ndarray, unary: np.ndarray, params: CrfParams) -> np.ndarray:
    """Run mean-field inference and return the posterior Q as float32 (n_labels, H, W).

    image: RGB (H, W, 3) uint8. unary: float32 (n_labels, H*W) energies (negative log
    probabilities), n_labels >= 2.
    """
    densecrf = import_densecrf()
    rgb = _check_image(image)
    h, w = rgb.shape[:2]
    unary = np.ascontiguousarray(unary, dtype=np.float32)
    if unary.ndim != 2 or unary.shape[1] != h * w or unary.shape[0] < 2:
        raise ValueError(f"unary must be (n_labels >= 2, {h * w}), got {unary.shape}")
    n_labels = unary.shape[0]
    crf = densecrf.DenseCRF2D(w, h, n_labels)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=rgb,
        compat=params.bilateral_compat,
    )
    q = crf.inference(int(params.iterations))
    return np.asarray(q, dtype=np.float32).reshape(n_labels, h, w)


def crf_from_labels(
    image: np.ndarray, label: np.ndarray, n_labels: int, params: CrfParams
) -> np.ndarray:
    """Refine a hard compact label map; returns compact labels (H, W) uint8.

    image: RGB (H, W, 3) uint8. label: (H, W) ints in 0..n_labels-1 (0 = background). The unary
    gives each pixel's label probability `params.gt_prob` and the other labels an equal share of
    the rest (pydensecrf's `unary_from_labels`, zero_unsure=False: 0 is a real label). Ties in
    the posterior go to the lowest index. With n_labels == 1 there is nothing to decide and the
    map is returned as is.
    """
    label = np.asarray(label)
    if label.ndim != 2 or label.shape != np.asarray(image).shape[:2]:
        raise ValueError(f"label {label.shape} does not match image {np.asarray(image).shape}")
    if not 1 <= n_labels <= 256:
        raise ValueError(f"n_labels must be in 1..256, got {n_labels}")
    if label.size and (label.min() < 0 or label.max() >= n_labels):
        raise ValueError(f"label values must be in 0..{n_labels - 1}")
    if n_labels == 1:
        import_densecrf()  # fail the same way with or without classes
        return np.zeros(label.shape, dtype=np.uint8)
    utils = _utils()
    unary = utils.unary_from_labels(
        label.astype(np.int64), n_labels, gt_prob=params.gt_prob, zero_unsure=False
    )
    q = crf_posterior(image, unary, params)
    labels: np.ndarray = np.argmax(q, axis=0).astype(np.uint8)
    return labels


def crf_from_probs(image: np.ndarray, probs: np.ndarray, params: CrfParams) -> np.ndarray:
    """Refine per-pixel probabilities; returns compact labels (H, W) uint8.

    image: RGB (H, W, 3) uint8. probs: float (n_labels, H, W), each pixel summing to 1 (index 0
    = background). The unary is -log(max(p, 1e-5)) (pydensecrf's `unary_from_softmax`). Ties in
    the posterior go to the lowest index.
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[1:] != np.asarray(image).shape[:2]:
        raise ValueError(f"probs {probs.shape} do not match image {np.asarray(image).shape}")
    if not 1 <= probs.shape[0] <= 256:
        raise ValueError(f"probs must have 1..256 planes, got {probs.shape[0]}")
    if probs.shape[0] == 1:
        import_densecrf()
        return np.zeros(probs.shape[1:], dtype=np.uint8)
    unary = _utils().unary_from_softmax(probs)
    q = crf_posterior(image, unary, params)
    labels: np.ndarray = np.argmax(q, axis=0).astype(np.uint8)
    return labels


def label_from_probs(probs: np.ndarray, image: np.ndarray | None = None,
                     crf: str | None = None, renormalize: bool = True) -> np.ndarray:
    """(H, W) uint8 argmax of (n_cls, H, W) probabilities, optionally CRF-refined.

    With a `crf` preset, the CRF runs on the image (RGB uint8, required) with the planes of
    the classes present in the argmax only, as the reference does; one present class is
    returned as is. `renormalize` rescales those planes to sum to 1 per pixel; the reference
    passes them as they are (`renormalize=False`: with its un-normalised 0.8 P1 + P2 they reach
    1.8, and the unary's clip to [1e-5, 1] then flattens the confident pixels, so the CRF
    smooths more; hustvl/WeakTr 0ff9d9a OnlineRetraining/segm/eval/miou.py:85-93).
    """
    if probs.shape[0] > 255:
        raise WeakTrError(f"{probs.shape[0]} classes do not fit a uint8 label map")
    label: np.ndarray = np.argmax(probs, axis=0).astype(np.uint8)
    if crf is None:
        return label
    if image is None:
        raise WeakTrError("the CRF needs the image")
    keys = np.unique(label)
    if len(keys) == 1:
        return label
    planes = probs[keys]
    if renormalize:
        planes = planes / np.maximum(planes.sum(axis=0, keepdims=True), 1e-12)
    refined = crf_from_probs(image, planes, get_preset(crf))
    out: np.ndarray = keys.astype(np.uint8)[refined]
    return out
