"""Does an artifact (or a model) belong to a dataset? One check for every phase.

An artifact records the class names it was made with and the ids of its images; a
checkpoint records the class names it was trained on. Before a phase pairs either with a
dataset, the names must be the dataset's (same order, background first) and every id must be
one of the dataset's; `align_ids` returns the shared ids in dataset order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from weaktr_cli.data.base import SegmentationDataset
from weaktr_cli.errors import WeakTrError

__all__ = ["align_ids", "check_class_names"]


def check_class_names(source: str, class_names: Sequence[str], dataset: SegmentationDataset,
                      *, hint: str) -> None:
    """Raise `WeakTrError` unless `class_names` (of `source`, e.g. "cams.h5") are the
    dataset's class names."""
    names, expected = tuple(class_names), tuple(dataset.class_names)
    if names == expected:
        return
    counts = f"{source} has {len(names)} classes, dataset {dataset.name!r} has {len(expected)}"
    if len(names) != len(expected):
        raise WeakTrError(f"{counts} (other class names)", hint=hint)
    first = next(i for i, (a, b) in enumerate(zip(names, expected, strict=True)) if a != b)
    raise WeakTrError(f"{counts} with other class names (class {first} is {names[first]!r} "
                      f"there, {expected[first]!r} here)", hint=hint)


def align_ids(source: str, class_names: Sequence[str], ids: Iterable[str],
              dataset: SegmentationDataset, *, hint: str) -> list[str]:
    """The `ids` of `source` in dataset order, after checking its class names; an id the
    dataset lacks is an error (naming up to five of them)."""
    check_class_names(source, class_names, dataset, hint=hint)
    known = set(dataset.ids)
    ids = list(ids)
    missing = [i for i in ids if i not in known]
    if missing:
        shown = ", ".join(repr(i) for i in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeakTrError(
            f"{len(missing)} image(s) of {source} are not in dataset {dataset.name!r} split "
            f"{dataset.split!r} ({shown}{more} not in {dataset.name}/{dataset.split})",
            hint=hint)
    present = set(ids)
    return [i for i in dataset.ids if i in present]
