"""Score an artifact against a dataset's pixel ground truth, streaming one image at a time."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from weaktr_cli.artifacts import ArtifactReader
from weaktr_cli.data.base import SegmentationDataset
from weaktr_cli.errors import WeakTrError
from weaktr_cli.metrics import ConfusionMatrix, Scores, ThresholdSweep

Progress = Callable[[int, int], None]


@dataclass
class Evaluation:
    """Result of `evaluate_artifact`: the scores, and for CAMs the whole threshold sweep."""

    kind: str
    class_names: tuple[str, ...]
    num_images: int
    scores: Scores
    threshold: float | None = None
    sweep: list[tuple[float, float]] = field(default_factory=list)
    #: (threshold, mIoU) the reference's early-stopping search finds in `sweep` (CAMs only)
    reference: tuple[float, float] | None = None
    search_start: float = 0.40

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"kind": self.kind, "num_images": self.num_images}
        if self.threshold is not None:
            out["best_threshold"] = self.threshold
            out["sweep"] = [{"threshold": t, "miou": round(m * 100, 4)} for t, m in self.sweep]
        if self.reference is not None:
            out["search_start"] = self.search_start
            out["reference_search"] = {"threshold": self.reference[0],
                                       "miou": round(self.reference[1] * 100, 4)}
        out.update(self.scores.to_dict(self.class_names))
        return out


#: Where the reference's CAM threshold search starts: 0.40 in 0ff9d9a (main.py
#: --eval_miou_threshold_start), 0.30 in 3547b87.
REFERENCE_SEARCH_START = 0.40


def reference_search(sweep: Sequence[tuple[float, float]],
                     start: float = REFERENCE_SEARCH_START) -> tuple[float, float] | None:
    """The (threshold, mIoU) the reference's CAM evaluation reports from a sweep.

    It walks the thresholds upward from `start` and stops at the first one that does not
    improve the mIoU (hustvl/WeakTr 0ff9d9a evaluation.py:258-267), so it can stop at a local
    maximum below the sweep's best. None when the sweep has no threshold at or above `start`.
    """
    best: tuple[float, float] | None = None
    for threshold, miou in sorted(sweep):
        if threshold < start - 1e-9:
            continue
        if best is not None and not miou > best[1]:
            break
        best = (threshold, miou)
    return best


def check_compatible(reader: ArtifactReader, dataset: SegmentationDataset) -> None:
    """Fail clearly when an artifact cannot be scored against `dataset`."""
    from weaktr_cli.data.align import align_ids, check_class_names

    hint = "evaluate against the dataset the artifact was made from (see `weaktr inspect`)"
    check_class_names(str(reader.path), reader.meta.class_names, dataset, hint=hint)
    if not dataset.has_masks:
        raise WeakTrError(
            f"dataset {dataset.name!r} split {dataset.split!r} has no pixel ground truth to score"
        )
    align_ids(str(reader.path), reader.meta.class_names, reader.ids, dataset,
              hint="pass the --data/--split the artifact was made from")


def evaluate_artifact(
    reader: ArtifactReader,
    dataset: SegmentationDataset,
    *,
    thresholds: Sequence[float] | np.ndarray | None = None,
    progress: Progress | None = None,
    reference_start: float = REFERENCE_SEARCH_START,
) -> Evaluation:
    """Score a `labels` artifact, or sweep background thresholds for a `cams` artifact.

    For CAMs both figures are kept: the best of the whole sweep (`threshold`, `scores`) and
    what the reference's early-stopping search from `reference_start` reports (`reference`).
    """
    check_compatible(reader, dataset)
    total = len(reader)
    if total == 0:
        raise WeakTrError(f"{reader.path} holds no images")
    n = dataset.num_classes
    truths = _prefetched_ground_truth(dataset, reader.ids)
    if reader.kind == "labels":
        matrix = ConfusionMatrix(n)
        for done, (image_id, truth) in enumerate(zip(reader.ids, truths, strict=True), 1):
            matrix.update(reader.read_labels(image_id), truth)
            if progress:
                progress(done, total)
        return Evaluation("labels", dataset.class_names, total, matrix.scores())

    if thresholds is None or len(thresholds) == 0:
        raise WeakTrError("no background thresholds to sweep")
    sweep = ThresholdSweep(n, thresholds)
    for done, (image_id, truth) in enumerate(zip(reader.ids, truths, strict=True), 1):
        record = reader.read_cams(image_id)
        sweep.update(record.class_ids, record.maps, truth)
        if progress:
            progress(done, total)
    results = sweep.results()
    # Best by mIoU; the lowest threshold wins ties so the choice is deterministic.
    best_t, best = max(results, key=lambda r: (np.nan_to_num(r[1].miou, nan=-1.0), -r[0]))
    curve = [(t, s.miou) for t, s in results]
    return Evaluation(
        "cams",
        dataset.class_names,
        total,
        best,
        threshold=best_t,
        sweep=curve,
        reference=reference_search(curve, reference_start),
        search_start=reference_start,
    )


def _prefetched_ground_truth(dataset: SegmentationDataset, ids: Sequence[str],
                             ahead: int = 8) -> Iterator[np.ndarray]:
    """The ground-truth masks of `ids` in order, decoded by one helper thread up to `ahead`
    images in advance: PNG decoding releases the GIL, so it overlaps the HDF5 reads and the
    confusion updates of the main thread, while memory stays bounded."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: deque[Future[np.ndarray]] = deque()
        for image_id in ids:
            pending.append(pool.submit(_ground_truth, dataset, image_id))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _ground_truth(dataset: SegmentationDataset, image_id: str) -> np.ndarray:
    mask = dataset.load_mask(image_id)
    if mask is None:
        raise WeakTrError(f"image {image_id!r} has no ground-truth mask")
    return mask


def parse_thresholds(text: str) -> list[float]:
    """"0.3:0.6:0.01" (start:stop:step, stop included) or "0.3,0.4,0.5" -> sorted thresholds."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = round((stop - start) / step) + 1
            values = [round(start + i * step, 6) for i in range(count)]
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise WeakTrError(
            f"invalid thresholds {text!r}", hint="write start:stop:step or a comma list"
        ) from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise WeakTrError(f"thresholds {text!r} must lie in [0, 1]")
    return sorted(values)
