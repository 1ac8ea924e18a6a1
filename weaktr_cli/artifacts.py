"""The HDF5 artifacts that phases exchange: the only module that knows their layout.

Two kinds share one schema (documented for third parties in docs/artifacts.md):

- ``cams``: per image, maps (K, H, W) in [0, 1] (stored in 1/1024 steps by `cam_codec.py`)
  of the K classes present in the image-level label, at the image's original size, with
  their class ids in attribute ``class_ids`` (int16, K). Dataset path ``/cams/<id>``.
- ``labels``: per image, a uint8 (H, W) label map of class ids, 255 = ignore. Used for seeds
  and predictions. Dataset path ``/labels/<id>``.

Root attributes record how the file was made (kind, schema_version, dataset, split, class
names, command line, weaktr version, seed, creation time, parent artifacts with sha256) and,
optionally, the folder the images were read from (data_root).

This module reads artifacts and encodes their entries; `weaktr_cli.artifact_writer` streams
them into ``<out>.partial`` (resumable, one writer at a time) and publishes the finished file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shlex
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from weaktr_cli import __version__
from weaktr_cli.cam_codec import decode_maps, encode_maps
from weaktr_cli.errors import WeakTrError, refuse_newer

SCHEMA_VERSION = 2  # 2: CAMs may be stored quantised (cam_codec.py); 1 files read as before
KINDS = ("cams", "labels")
PARTIAL_SUFFIX = ".partial"
_NO_SEED = -1


@dataclass
class ArtifactMeta:
    """Provenance and identity of an artifact (its root attributes)."""

    kind: str
    dataset: str
    split: str
    class_names: tuple[str, ...]
    command: str = ""
    seed: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    parents: list[dict[str, str]] = field(default_factory=list)
    weaktr_version: str = __version__
    created: str = ""
    schema_version: int = SCHEMA_VERSION
    #: absolute folder the images were read from ("" if unknown), so `show`, `crf` and
    #: `evaluate` find a custom dataset or an image folder without --data-root
    data_root: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def same_content_as(self, other: ArtifactMeta) -> bool:
        """True when two metas describe the same set of images and classes (resume, merge)."""
        return (self.kind, self.dataset, self.split, tuple(self.class_names)) == (
            other.kind,
            other.dataset,
            other.split,
            tuple(other.class_names),
        )


def new_meta(
    kind: str,
    dataset: str,
    split: str,
    class_names: Iterable[str],
    *,
    seed: int | None = None,
    config: dict[str, Any] | None = None,
    parents: Iterable[str | Path] = (),
    data_root: str | Path | None = None,
) -> ArtifactMeta:
    """Metadata for a new artifact, with the current command line and parent checksums."""
    if kind not in KINDS:
        raise WeakTrError(f"unknown artifact kind {kind!r}", hint=f"use one of {', '.join(KINDS)}")
    return ArtifactMeta(
        kind=kind,
        dataset=dataset,
        split=split,
        class_names=tuple(class_names),
        command=shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        seed=seed,
        config=dict(config or {}),
        parents=[{"path": str(Path(p).resolve()), "sha256": file_sha256(p)} for p in parents],
        data_root=str(Path(data_root).resolve()) if data_root else "",
    )


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# HDF5 names cannot contain "/", so ids are escaped; "%" is escaped first to stay reversible.
def encode_id(image_id: str) -> str:
    if not image_id or image_id in (".", ".."):
        raise WeakTrError(f"invalid image id {image_id!r}")
    return image_id.replace("%", "%25").replace("/", "%2F")


def decode_id(name: str) -> str:
    return name.replace("%2F", "/").replace("%25", "%")


def now_iso() -> str:
    """ISO time of writing; $SOURCE_DATE_EPOCH (the reproducible-builds convention) pins it."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = (_dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch
              else _dt.datetime.now(_dt.timezone.utc))
    return moment.isoformat(timespec="seconds")


def write_meta(h5: Any, meta: ArtifactMeta) -> None:
    attrs = h5.attrs
    attrs["weaktr_kind"] = meta.kind
    attrs["schema_version"] = SCHEMA_VERSION
    attrs["dataset"] = meta.dataset
    attrs["split"] = meta.split
    attrs["class_names"] = json.dumps(list(meta.class_names))
    attrs["command"] = meta.command
    attrs["weaktr_version"] = meta.weaktr_version
    attrs["seed"] = _NO_SEED if meta.seed is None else int(meta.seed)
    attrs["created"] = meta.created or now_iso()
    attrs["config"] = json.dumps(meta.config, sort_keys=True, default=str)
    attrs["parents"] = json.dumps(meta.parents)
    if meta.data_root:
        attrs["data_root"] = meta.data_root


def read_root_meta(h5: Any, path: Path) -> ArtifactMeta:
    attrs = h5.attrs

    def required(name: str) -> Any:
        if name not in attrs:
            raise WeakTrError(
                f"{path} is not a weaktr artifact: root attribute {name!r} is missing",
                hint="see docs/artifacts.md for the schema",
            )
        value = attrs[name]
        return value.decode() if isinstance(value, bytes) else value

    def integer(name: str, value: Any) -> int:
        try:
            return int(value)
        except (TypeError, ValueError, OverflowError):
            raise WeakTrError(f"{path}: root attribute {name!r} is {value!r}, not an integer",
                              hint="the file is damaged or not a weaktr artifact; see "
                              "docs/artifacts.md") from None

    version = integer("schema_version", required("schema_version"))
    refuse_newer(f"{path} has schema_version", version, SCHEMA_VERSION)
    kind = str(required("weaktr_kind"))
    if kind not in KINDS:
        raise WeakTrError(f"{path} has unknown kind {kind!r}", hint=f"expected {', '.join(KINDS)}")

    def optional_json(name: str, default: Any) -> Any:
        if name not in attrs:
            return default
        raw = attrs[name]
        try:
            return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        except (TypeError, ValueError) as exc:
            raise WeakTrError(f"{path}: root attribute {name!r} is not valid JSON") from exc

    class_names = optional_json("class_names", None)
    if not isinstance(class_names, list) or not all(isinstance(n, str) for n in class_names):
        raise WeakTrError(
            f"{path}: root attribute 'class_names' must be a JSON list of strings",
            hint="see docs/artifacts.md",
        )
    seed = integer("seed", attrs.get("seed", _NO_SEED))

    def text(name: str) -> str:
        value = attrs.get(name, "")
        return value.decode() if isinstance(value, bytes) else str(value)

    config = optional_json("config", {})
    parents = optional_json("parents", [])
    if not isinstance(config, dict) or not isinstance(parents, list) or not all(
            isinstance(p, dict) for p in parents):
        raise WeakTrError(f"{path}: root attributes 'config' / 'parents' must be a JSON object "
                          "/ list", hint="see docs/artifacts.md")
    return ArtifactMeta(
        kind=kind,
        dataset=str(required("dataset")),
        split=str(required("split")),
        class_names=tuple(class_names),
        command=text("command"),
        seed=None if seed == _NO_SEED else seed,
        config=config,
        parents=parents,
        weaktr_version=text("weaktr_version"),
        created=text("created"),
        schema_version=version,
        data_root=text("data_root"),
    )


@dataclass(frozen=True)
class CamRecord:
    """CAMs of one image: `maps` float32 (K, H, W) in [0, 1]; `class_ids` int64 (K,)."""

    class_ids: np.ndarray
    maps: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        return int(self.maps.shape[1]), int(self.maps.shape[2])


#: One image's entry: CAMs (kind ``cams``) or an (H, W) label map (kind ``labels``).
Entry = CamRecord | np.ndarray
#: An entry as stored: the dataset's data and its attributes.
Encoded = tuple[np.ndarray, dict[str, np.ndarray]]


def encode_cams(image_id: str, class_ids: np.ndarray, maps: np.ndarray) -> Encoded:
    """Stored form of one image's CAMs: maps (K, H, W) float in [0, 1], class_ids (K,) ints."""
    maps = np.asarray(maps)
    class_ids = np.asarray(class_ids).reshape(-1)
    if maps.ndim != 3 or maps.shape[0] != class_ids.shape[0]:
        raise ValueError(f"maps {maps.shape} do not match {class_ids.shape[0]} class ids")
    if not np.isfinite(maps).all():
        raise WeakTrError(f"CAMs of image {image_id!r} contain NaN or inf")
    data, attrs = encode_maps(maps)  # 1/1024 steps as row differences (cam_codec.py)
    return data, {**attrs, "class_ids": class_ids.astype(np.int16)}


def encode_labels(label: np.ndarray) -> Encoded:
    """Stored form of one (H, W) label map of class ids (255 = ignore)."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be 2-D, got {label.shape}")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError("label values must fit in uint8")
        label = label.astype(np.uint8)
    return label, {}


def encode_entry(kind: str, image_id: str, entry: Entry) -> Encoded:
    if kind == "cams":
        if not isinstance(entry, CamRecord):
            raise TypeError(f"a cams artifact stores CamRecord entries, got {type(entry)}")
        return encode_cams(image_id, entry.class_ids, entry.maps)
    if isinstance(entry, CamRecord):
        raise TypeError("a labels artifact stores label maps, got a CamRecord")
    return encode_labels(entry)


def store_entry(group: Any, image_id: str, encoded: Encoded) -> None:
    """Create `/<kind>/<id>` in an open group (one gzip chunk per image)."""
    data, attrs = encoded
    compress = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    # No object timestamps: seeded runs then write identical bytes.
    ds = group.create_dataset(encode_id(image_id), data=data, track_times=False,
                              **(compress if data.size else {}))
    for key in sorted(attrs):  # one order, so an entry copied on resume has the same bytes
        ds.attrs[key] = attrs[key]


def load_entry(group: Any, image_id: str) -> Encoded:
    """The stored data and attributes of one entry, as `store_entry` was given them."""
    ds = group[encode_id(image_id)]
    return np.asarray(ds[()]), {key: np.asarray(ds.attrs[key]) for key in sorted(ds.attrs)}


def entry_digest(image_id: str, encoded: Encoded) -> str:
    """sha256 of an entry's id, data and attributes (what a resume checks kept entries by)."""
    digest = hashlib.sha256(image_id.encode())
    data, attrs = encoded
    for name, array in [("", data), *sorted(attrs.items())]:
        array = np.ascontiguousarray(array)
        digest.update(f"|{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


#: What h5py raises on a damaged file besides OSError (bad B-tree, bad version number, ...).
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError)


DAMAGED_HINT = "re-create the artifact; an interrupted run leaves its data in a .partial file"


def damaged(path: Path, exc: BaseException, what: str = "") -> WeakTrError:
    where = f" ({what})" if what else ""
    return WeakTrError(
        f"{path} is damaged{where}: {type(exc).__name__}: {exc}".splitlines()[0],
        hint=DAMAGED_HINT,
    )


class _Attributes:
    """The attributes of a low-level dataset, read on demand (what `decode_maps` needs of
    h5py's `ds.attrs`: `in`, `[]` and `get`)."""

    def __init__(self, dsid: Any) -> None:
        self._dsid = dsid

    def __contains__(self, name: str) -> bool:
        from h5py import h5a

        return bool(h5a.exists(self._dsid, name.encode()))

    def __getitem__(self, name: str) -> np.ndarray:
        from h5py import h5a

        if name not in self:
            raise KeyError(f"no attribute {name!r}")
        attr = h5a.open(self._dsid, name.encode())
        value = np.empty(attr.shape, dtype=attr.dtype)
        attr.read(value)
        return value

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default


def open_h5(path: Path, mode: str) -> Any:
    import h5py

    try:
        return h5py.File(path, mode)
    except H5_ERRORS as exc:
        raise WeakTrError(
            f"cannot open {path} as HDF5 (truncated or corrupt file?): {exc}".splitlines()[0],
            hint="re-create the artifact; an interrupted run leaves its data in a .partial file",
        ) from exc


class ArtifactReader:
    """Random access by id and ordered iteration over a finished artifact.

    Open with `open_artifact`; use as a context manager or call `close()`.
    """

    def __init__(self, path: Path, h5: Any, meta: ArtifactMeta) -> None:
        self.path = path
        self.meta = meta
        self._h5 = h5
        try:
            group = h5.get(meta.kind)
            if group is None:
                raise WeakTrError(f"{path} has no /{meta.kind} group",
                                  hint="see docs/artifacts.md")
            self.ids: list[str] = [decode_id(name) for name in group]
            self._known = set(self.ids)
        except H5_ERRORS as exc:
            raise damaged(path, exc, "its list of images") from exc
        self._group = group

    @property
    def kind(self) -> str:
        return self.meta.kind

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and image_id in self._known

    def _data(self, image_id: str) -> tuple[Any, np.ndarray]:
        """(low-level dataset, its whole data) of one entry.

        h5py's low-level calls: `group[name][()]` spends about 0.35 ms per entry in h5py's
        Python layer, more than the read itself on small images (issue 16, `evaluate`).
        """
        from h5py import h5d, h5s

        if image_id not in self:
            raise WeakTrError(f"{self.path} has no entry for image {image_id!r}")
        name = encode_id(image_id)
        try:
            dsid = h5d.open(self._group.id, name.encode())
            dtype = dsid.dtype
            if dtype.kind not in "biuf":  # not a number: let h5py convert it as it can
                return dsid, np.asarray(self._group[name][()])
            data = np.empty(dsid.get_space().shape, dtype=dtype)
            if data.size:
                dsid.read(h5s.ALL, h5s.ALL, data)
        except H5_ERRORS as exc:
            raise damaged(self.path, exc, f"entry {image_id!r}") from exc
        return dsid, data

    def read_cams(self, image_id: str) -> CamRecord:
        """The CAMs of one image (kind ``cams``)."""
        self._expect("cams")
        dsid, data = self._data(image_id)
        try:
            attrs = _Attributes(dsid)
            maps = decode_maps(data, attrs)
            class_ids = np.asarray(attrs["class_ids"], dtype=np.int64).reshape(-1)
        except H5_ERRORS as exc:
            raise damaged(self.path, exc, f"entry {image_id!r}") from exc
        if maps.ndim != 3 or maps.shape[0] != class_ids.shape[0]:
            raise WeakTrError(
                f"{self.path}: entry {image_id!r} has maps {maps.shape} for "
                f"{class_ids.shape[0]} class ids; expected (K, H, W) with K class ids"
            )
        if class_ids.size and (class_ids.min() < 1 or class_ids.max() >= self.meta.num_classes):
            raise WeakTrError(
                f"{self.path}: entry {image_id!r} has class ids outside "
                f"1..{self.meta.num_classes - 1}"
            )
        if not np.isfinite(maps).all():
            raise WeakTrError(
                f"{self.path}: the CAMs of image {image_id!r} contain NaN or Inf values",
                hint="CAMs must be finite values in [0, 1]; dump the CAMs again",
            )
        return CamRecord(class_ids=class_ids, maps=maps)

    def read_labels(self, image_id: str) -> np.ndarray:
        """The (H, W) uint8 label map of one image (kind ``labels``)."""
        self._expect("labels")
        _, label = self._data(image_id)
        if label.ndim != 2 or label.dtype != np.uint8:
            raise WeakTrError(
                f"{self.path}: entry {image_id!r} is {label.dtype} {label.shape}; "
                "expected a 2-D uint8 label map"
            )
        return label

    def read(self, image_id: str) -> CamRecord | np.ndarray:
        return self.read_cams(image_id) if self.kind == "cams" else self.read_labels(image_id)

    def __iter__(self) -> Iterator[tuple[str, CamRecord | np.ndarray]]:
        for image_id in self.ids:
            yield image_id, self.read(image_id)

    def stored_bytes(self) -> int:
        """Bytes the per-image data occupies on disk (after compression)."""
        try:
            return sum(int(self._group[name].id.get_storage_size()) for name in self._group)
        except H5_ERRORS as exc:
            raise damaged(self.path, exc) from exc

    def _expect(self, kind: str) -> None:
        if self.kind != kind:
            raise WeakTrError(f"{self.path} holds {self.kind}, not {kind}")

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> ArtifactReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_artifact(path: str | Path, kind: str | None = None) -> ArtifactReader:
    """Open a finished artifact read-only, checking its schema (and its kind if given)."""
    path = Path(path)
    if not path.is_file():
        partial = path.with_name(path.name + PARTIAL_SUFFIX)
        hint = (
            f"an unfinished run left {partial.name}; rerun the command to resume it"
            if partial.exists()
            else None
        )
        raise WeakTrError(f"artifact {path} does not exist", hint=hint)
    from weaktr_cli.h5_probe import reads_without_crashing

    if not reads_without_crashing(path, root_only=True):
        raise WeakTrError(f"{path} is damaged (reading its root attributes crashed HDF5)",
                          hint=DAMAGED_HINT)
    h5 = open_h5(path, "r")
    try:
        try:
            meta = read_root_meta(h5, path)
        except H5_ERRORS as exc:
            raise damaged(path, exc, "its root attributes") from exc
        if kind is not None and meta.kind != kind:
            raise WeakTrError(
                f"{path} is a {meta.kind!r} artifact, but a {kind!r} artifact is needed here"
            )
        return ArtifactReader(path, h5, meta)
    except BaseException:
        h5.close()
        raise


def read_meta(path: str | Path) -> ArtifactMeta:
    with open_artifact(path) as reader:
        return reader.meta


def __getattr__(name: str) -> Any:
    # The writer moved to `weaktr_cli.artifact_writer`; keep `from weaktr_cli.artifacts import
    # ArtifactWriter` working for code written before the move.
    if name in ("ArtifactWriter", "merge_artifacts", "write_artifact"):
        from weaktr_cli import artifact_writer

        return getattr(artifact_writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
