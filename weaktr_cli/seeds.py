"""Phase 3: CAMs -> pseudo-label seeds (threshold against a background level, then dense CRF).

Per image, the CAM maps of the K present classes are stacked in ascending class-id order under
a constant background plane `bg` (compact space: 0 = background, k = k-th present class). The
hard label is the first maximum over the planes, so a class wins a pixel only if its CAM is
strictly above `bg` and above every lower class id, and equal to or above every higher one.
The CRF refines that compact map and the result is mapped back to dataset class ids.

`make_seeds` streams a whole CAM artifact into a ``labels`` artifact through a pool of worker
processes (forked where safe) that open the CAM file themselves; the parent alone writes, in
dataset order, while they compute, so the output is the same for any number of workers.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import signal
import sys
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import numpy as np

from weaktr_cli.artifact_writer import write_artifact
from weaktr_cli.artifacts import ArtifactReader, CamRecord, new_meta, open_artifact
from weaktr_cli.data.base import IGNORE_INDEX, SegmentationDataset
from weaktr_cli.dense_crf import CrfParams, crf_from_labels, crf_from_probs, import_densecrf
from weaktr_cli.errors import WeakTrError
from weaktr_cli.shards import select_shard

UNARIES = ("hard", "soft")
ProgressFn = Callable[[int, int], None]


def check_bg(bg: float) -> float:
    """Validate the background level: CAMs are min-max normalised, so it must lie in [0, 1]."""
    bg = float(bg)
    if not (math.isfinite(bg) and 0.0 <= bg <= 1.0):
        raise WeakTrError(
            f"background threshold must be in [0, 1], got {bg}",
            hint="WeakTr uses 0.43 for VOC and 0.42 for COCO",
        )
    return bg


def _sorted_record(record: CamRecord) -> tuple[np.ndarray, np.ndarray]:
    """(lut, maps): lut uint8 (K+1,) = [0, ascending class ids]; maps float32 (K, H, W) to match."""
    class_ids = np.asarray(record.class_ids, dtype=np.int64).reshape(-1)
    maps = np.asarray(record.maps, dtype=np.float32)
    if maps.ndim != 3 or maps.shape[0] != class_ids.shape[0]:
        raise ValueError(f"maps {maps.shape} do not match {class_ids.shape[0]} class ids")
    if class_ids.size and (class_ids.min() < 1 or class_ids.max() >= IGNORE_INDEX):
        raise ValueError(f"class ids must be in 1..{IGNORE_INDEX - 1}, got {class_ids.tolist()}")
    if np.unique(class_ids).size != class_ids.size:
        raise ValueError(f"duplicate class ids {class_ids.tolist()}")
    # A fixed order makes ties independent of how the CAM writer listed the classes.
    order = np.argsort(class_ids, kind="stable")
    lut = np.concatenate([[0], class_ids[order]]).astype(np.uint8)
    return lut, maps[order]


def label_ids(record: CamRecord) -> np.ndarray:
    """uint8 (K+1,) lookup table compact index -> class id: [0, present ids ascending]."""
    return _sorted_record(record)[0]


def _planes(record: CamRecord, bg: float) -> tuple[np.ndarray, np.ndarray]:
    lut, maps = _sorted_record(record)
    h, w = maps.shape[1:]
    planes = np.empty((maps.shape[0] + 1, h, w), dtype=np.float32)
    planes[0] = bg
    planes[1:] = maps
    return lut, planes


def cams_to_compact(record: CamRecord, bg: float) -> tuple[np.ndarray, np.ndarray]:
    """(compact, lut): compact (H, W) uint8 indices into lut (see `label_ids`).

    Index 0 is background; ties go to the first maximum, i.e. background beats any class that
    only equals `bg`, and among classes the lower class id wins.
    """
    lut, planes = _planes(record, check_bg(bg))
    return np.argmax(planes, axis=0).astype(np.uint8), lut


def cams_to_label(record: CamRecord, bg: float) -> np.ndarray:
    """Threshold seeds: (H, W) uint8 dataset class ids (0 = background, never 255).

    record: maps float32 (K, H, W) in [0, 1] with class_ids int64 (K,). See `cams_to_compact`
    for the tie rule. With K = 0 every pixel is background.
    """
    compact, lut = cams_to_compact(record, bg)
    label: np.ndarray = lut[compact]
    return label


def ambiguous_seed_pixels(label: np.ndarray, record: CamRecord, ratio: float) -> np.ndarray:
    """(H, W) bool: foreground seed pixels whose CAM another present class nearly matches.

    A pixel labelled class c is ambiguous when some other class of the image has a CAM at
    least `ratio` x c's CAM there: the CAMs could not tell the two apart, so the seed's
    choice between them is a coin flip (on shapes, both shapes of one colour: half of these
    pixels are right, against 99.8 % of the other foreground pixels of multi-class images).
    Background and ignored pixels, and images with one class, are never ambiguous.
    """
    if not 0.0 < ratio <= 1.0:
        raise WeakTrError(f"ambiguity ratio must be in (0, 1], got {ratio}")
    lut, maps = _sorted_record(record)
    label = np.asarray(label)
    if maps.shape[1:] != label.shape:
        raise WeakTrError(f"seeds {label.shape} and CAMs {maps.shape[1:]} differ in size",
                          hint="use the CAMs the seeds were made from")
    ambiguous = np.zeros(label.shape, dtype=bool)
    if maps.shape[0] < 2:
        return ambiguous
    index = np.full(256, -1, dtype=np.int64)
    index[lut[1:]] = np.arange(maps.shape[0])
    compact = index[label]  # -1: background, ignore, or a class without a CAM
    rows, cols = np.nonzero(compact >= 0)
    own = compact[rows, cols]
    scores = maps[:, rows, cols]  # (K, n)
    winner = scores[own, np.arange(own.size)]
    scores[own, np.arange(own.size)] = -np.inf
    ambiguous[rows, cols] = scores.max(axis=0) >= ratio * winner
    return ambiguous


def cams_to_probs(record: CamRecord, bg: float) -> np.ndarray:
    """Soft unary: float32 (K+1, H, W) in compact order (`label_ids`), summing to 1 per pixel.

    The planes [bg, CAM_1, ..., CAM_K] (CAMs clipped to [0, 1]) are divided by their per-pixel
    sum. This is a plain normalisation, not a softmax, so the most likely label is the same as
    in `cams_to_label` and a class's share grows linearly with its CAM. A pixel whose planes are
    all zero (only possible with bg = 0) gets the uniform distribution.
    """
    _, planes = _planes(record, check_bg(bg))
    np.clip(planes, 0.0, 1.0, out=planes)
    total = planes.sum(axis=0, keepdims=True)
    empty = total <= 0
    planes = np.where(empty, 1.0 / planes.shape[0], planes / np.where(empty, 1.0, total))
    return planes.astype(np.float32)


def seed_image(
    image: np.ndarray,
    record: CamRecord,
    *,
    bg: float,
    params: CrfParams | None,
    unary: str = "hard",
    mark_disagreement: bool = False,
    image_id: str | None = None,
) -> np.ndarray:
    """Seeds of one image: (H, W) uint8 dataset class ids.

    image: RGB (H, W, 3) uint8 at the CAMs' size. params None gives the plain threshold seeds
    (`cams_to_label`). Otherwise a dense CRF refines them, its unary either the hard threshold
    label ("hard", the reference) or `cams_to_probs` ("soft"). With mark_disagreement, pixels
    where the CRF result differs from the threshold label are set to 255 (ignored in training).
    `image_id` only names the image in error messages.
    """
    _check_options(params, unary, mark_disagreement)
    image = np.asarray(image)
    name = f"image {image_id!r}" if image_id is not None else "image"
    if image.ndim != 3 or image.shape[2] != 3:
        raise WeakTrError(f"{name} is {image.shape}, expected an RGB (H, W, 3) array")
    cam_size = tuple(int(s) for s in np.asarray(record.maps).shape[1:])
    if tuple(image.shape[:2]) != cam_size:
        raise WeakTrError(
            f"{name} is {image.shape[0]}x{image.shape[1]} (HxW) but its CAMs are "
            f"{cam_size[0]}x{cam_size[1]}",
            hint="the CAM artifact was made from other images; dump CAMs for this dataset again",
        )
    compact, lut = cams_to_compact(record, bg)
    if params is None:
        seeds: np.ndarray = lut[compact]
        return seeds
    n_labels = lut.shape[0]
    if unary == "hard":
        refined = crf_from_labels(image, compact, n_labels, params)
    else:
        refined = crf_from_probs(image, cams_to_probs(record, bg), params)
    out: np.ndarray = lut[refined]
    if mark_disagreement:
        out[refined != compact] = IGNORE_INDEX
    return out


def _check_options(params: CrfParams | None, unary: str, mark_disagreement: bool) -> None:
    if unary not in UNARIES:
        raise WeakTrError(f"unknown CRF unary {unary!r}", hint=f"use one of {', '.join(UNARIES)}")
    if params is None and unary != "hard":
        raise WeakTrError("a soft unary needs the CRF", hint="drop --no-crf or the unary option")
    if params is None and mark_disagreement:
        raise WeakTrError(
            "marking CRF disagreement needs the CRF",
            hint="drop --no-crf or --mark-disagreement",
        )


def seeds_config(
    *,
    bg: float,
    params: CrfParams | None,
    unary: str,
    mark_disagreement: bool,
    shard: tuple[int, int] | None,
) -> dict[str, Any]:
    """The provenance config a seeds artifact records (JSON-native values)."""
    return {
        "bg": float(bg),
        "crf": None if params is None else params.to_dict(),
        "unary": unary,
        "mark_disagreement": bool(mark_disagreement),
        "shard": None if shard is None else [int(shard[0]), int(shard[1])],
    }




# Worker state: each spawn worker opens the CAM file itself (h5py handles must not cross
# process boundaries) and gets the dataset pickled once, through the pool initializer.
_WORKER: dict[str, Any] = {}


def _init_worker(cams_path: str, dataset: SegmentationDataset, options: dict[str, Any]) -> None:
    # Ctrl-C reaches the whole process group; only the parent reacts (terminates the pool and
    # keeps the partial file), so workers do not each print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _tune_worker_process()
    _WORKER["reader"] = open_artifact(cams_path, kind="cams")
    _WORKER["dataset"] = dataset
    _WORKER["options"] = options


def _tune_worker_process() -> None:
    """Linux (glibc): be killed with the parent, and keep freed memory for the next image.

    A SIGKILLed crf run's workers would otherwise finish their current images and then fail
    on the closed pipe, a traceback each. And with glibc's defaults every image's CRF buffers
    are handed back to the OS when freed and faulted in again for the next image: about 500
    page faults an image, a tenth of a shapes image's CRF time (issue 16). A worker's memory
    stays at what its largest image needed.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig, m_trim_threshold, m_mmap_threshold = 1, -1, -3
    with contextlib.suppress(OSError, AttributeError):  # not glibc: leave it as it is
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL))
        libc.mallopt(m_mmap_threshold, 32 << 20)
        libc.mallopt(m_trim_threshold, 128 << 20)


def _seed_one(
    reader: ArtifactReader, dataset: SegmentationDataset, image_id: str, options: dict[str, Any]
) -> np.ndarray:
    record = reader.read_cams(image_id)
    image = dataset.load_image(image_id)
    return seed_image(image, record, image_id=image_id, **options)


def _worker_task(image_id: str) -> tuple[str, np.ndarray | None, tuple[str, str | None] | None]:
    try:
        label = _seed_one(_WORKER["reader"], _WORKER["dataset"], image_id, _WORKER["options"])
    except WeakTrError as exc:
        # WeakTrError pickles without its hint; send both fields and re-raise in the parent.
        return image_id, None, (exc.message, exc.hint)
    return image_id, label, None


def make_seeds(
    cams_path: str | Path,
    dataset: SegmentationDataset,
    out_path: str | Path,
    *,
    bg: float,
    params: CrfParams | None,
    unary: str = "hard",
    mark_disagreement: bool = False,
    workers: int = 1,
    shard: tuple[int, int] | None = None,
    resume: bool = True,
    progress: ProgressFn | None = None,
) -> Path:
    """Turn a CAM artifact into a seeds (``labels``) artifact; returns the final path.

    Images are those of the CAM artifact (of `shard`, if given), in `dataset` order; the
    dataset supplies the RGB images. Ids already in a resumable `<out>.partial` are skipped.
    The images are computed in `workers` processes (see `_compute`) and written by this one,
    in order, so the label maps do not depend on `workers`. `progress(n_done, n_total)` is
    called once before the first image and after each one. On an error or Ctrl-C the partial
    file is kept for a later resume and nothing is written at `out_path`.
    """
    cams_path = Path(cams_path)
    out_path = Path(out_path)
    bg = check_bg(bg)
    _check_options(params, unary, mark_disagreement)
    if int(workers) != workers or workers < 1:
        raise WeakTrError(f"workers must be a positive integer, got {workers}")
    if params is not None:
        import_densecrf()  # fail before any work, not in the middle of a pool

    with open_artifact(cams_path, kind="cams") as reader:
        meta = reader.meta
        ids = _ordered_ids(reader, dataset)
    ids = select_shard(ids, shard)

    config = seeds_config(
        bg=bg, params=params, unary=unary, mark_disagreement=mark_disagreement, shard=shard
    )
    out_meta = new_meta(
        "labels", meta.dataset, meta.split, meta.class_names, config=config, parents=[cams_path],
        data_root=dataset.root or meta.data_root or None,
    )
    options = {
        "bg": bg,
        "params": params,
        "unary": unary,
        "mark_disagreement": mark_disagreement,
    }
    return write_artifact(
        out_path, out_meta, ids,
        lambda todo: _compute(cams_path, dataset, todo, options, workers),
        resume=resume, progress=progress,
    )


def _ordered_ids(reader: ArtifactReader, dataset: SegmentationDataset) -> list[str]:
    """The CAM artifact's ids in dataset order; ids unknown to the dataset are an error."""
    from weaktr_cli.data.align import align_ids

    return align_ids(str(reader.path), reader.meta.class_names, reader.ids, dataset,
                     hint="pass the dataset and split the CAMs were made from")


def _start_method() -> str:
    """fork where it is safe, else spawn.

    A forked worker starts in milliseconds with everything already imported (a spawned one
    imports weaktr, numpy, h5py and pydensecrf again: about a second of each worker's time on
    a small CPU). Forking a process that has run torch's thread pools can hang the children,
    so with torch loaded (the pipeline) the workers are spawned.
    """
    if "fork" in multiprocessing.get_all_start_methods() and "torch" not in sys.modules:
        return "fork"
    return "spawn"


def _compute(
    cams_path: Path,
    dataset: SegmentationDataset,
    ids: list[str],
    options: dict[str, Any],
    workers: int,
) -> Generator[tuple[str, np.ndarray], None, None]:
    """Yield (image_id, label) in the order of `ids`.

    The images are computed in `workers` processes while the caller writes the ones before:
    with one worker too, when it can be forked (a spawned one would first import everything
    again, about a second). Otherwise, and for a single image, they are computed here.
    """
    if not ids:
        return
    method = _start_method()
    if len(ids) == 1 or (workers == 1 and method != "fork"):
        with open_artifact(cams_path, kind="cams") as reader:
            for image_id in ids:
                yield image_id, _seed_one(reader, dataset, image_id, options)
        return
    n_proc = min(int(workers), len(ids))
    # Chunks amortise the IPC round trip but stay small so the parent writes steadily.
    chunksize = max(1, min(4, len(ids) // (4 * n_proc)))
    ctx = multiprocessing.get_context(method)
    pool = ctx.Pool(n_proc, initializer=_init_worker, initargs=(str(cams_path), dataset, options))
    try:
        for image_id, label, error in pool.imap(_worker_task, ids, chunksize=chunksize):
            if error is not None:
                raise WeakTrError(error[0], hint=error[1])
            assert label is not None
            yield image_id, label
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()
