"""Writing artifacts: one image at a time, one writer at a time, resumable, never half-published.

While a run writes `<out>`:

- `<out>.lock` is held (`files.output_lock`): a second writer of the same output is refused
  with the holder's PID, so it can neither read nor replace the first one's files.
- `<out>.partial` is the HDF5 file being written; it is flushed after every `SYNC_EVERY`
  images, when the run stops (error, Ctrl-C) and before it is published.
- `<out>.journal` starts with the sha256 of the run's content and settings, then gets one line
  per image whose flush completed: its id and the sha256 of its stored data and attributes.
  Lines are written only after the flush that stored their images, so a killed run (SIGKILL,
  power loss) loses at most the images since the last flush; a stopped one loses none.
- On success the partial file is fsynced and renamed to `<out>` and the journal removed. A
  file at the final path is therefore always complete; the previous one stays until then.

Resume (a rerun with the same settings): the entries the journal vouches for are copied, in
order, from the old partial file into a fresh one, each checked against its sha256, and the
run continues after the last good one. A partial file that cannot be read, or an entry that
fails its check, means starting over from there, and a warning says so; so does a partial
file whose recorded settings differ from the run's while its journal's match (its own record
is what is damaged). Other settings in both are another run's file: refused. Because the kept
entries go through the same writing path as new ones, a resumed artifact is byte-identical to
an uninterrupted run's (given the same `created` time, e.g. with $SOURCE_DATE_EPOCH).

A failed write (full disk, `ulimit -f`) leaves HDF5 in a state it cannot close from (h5py
crashes at exit), so the partial file is written through `_GuardedFile`, which records the
first OSError and drops every later write; the writer then stops with one clear line.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from weaktr_cli.artifacts import (
    H5_ERRORS,
    PARTIAL_SUFFIX,
    ArtifactMeta,
    ArtifactReader,
    Encoded,
    Entry,
    encode_cams,
    encode_entry,
    encode_labels,
    entry_digest,
    load_entry,
    new_meta,
    now_iso,
    open_artifact,
    read_root_meta,
    store_entry,
    write_meta,
)
from weaktr_cli.errors import WeakTrError
from weaktr_cli.files import check_output_path, output_lock, publish, write_error

JOURNAL_SUFFIX = ".journal"
NEW_SUFFIX = ".new"
#: Images between flushes of the partial file and its journal. A flush per image cost about
#: 0.5 ms of a crf image's 24 (issue 16); a fixed count, not a time, keeps the file's bytes
#: the same for every run, resumed or not (HDF5's layout depends on where the flushes fall).
SYNC_EVERY = 16
NO_RESUME_HINT = "rerun with the same settings to resume it, or pass --no-resume to start over"

log = logging.getLogger(__name__)


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


class _GuardedFile(io.RawIOBase):
    """An unbuffered file for h5py's `fileobj` driver that never lets a write fail.

    The first OSError is kept in `error` and every later write is dropped, so HDF5 sees no
    failure and can still close; the caller checks `error` after each flush.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._fh = open(path, "w+b", buffering=0)  # noqa: SIM115 (closed in close())
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _guard(self, action: Callable[[], Any], fallback: Any) -> Any:
        if self.error is not None:
            return fallback
        try:
            return action()
        except OSError as exc:
            self.error = exc
            return fallback

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return int(self._guard(lambda: self._fh.seek(offset, whence), offset))

    def tell(self) -> int:
        return self._fh.tell()

    def readinto(self, buffer: Any) -> int:
        return int(self._guard(lambda: self._fh.readinto(buffer), 0))

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        self._guard(lambda: self._fh.write(data), size)
        return size

    def truncate(self, size: int | None = None) -> int:
        return int(self._guard(lambda: self._fh.truncate(size), size or 0))

    def flush(self) -> None:
        if not self._fh.closed:
            self._guard(self._fh.flush, None)

    def close(self) -> None:
        if not self.closed:
            super().close()  # flushes first
            self._fh.close()


class ArtifactWriter:
    """Streams per-image entries into `<path>.partial`; `finalize()` publishes it at `path`.

    Before anything is written, `path` is checked (not a folder, in a writable folder, not one
    of the run's inputs: `meta.parents` and `inputs`) and its lock taken. With `resume=True`
    the verified entries of a partial file of the same content and settings are kept (in
    `order`, when given, up to the first missing one); `done_ids` names them, callers skip
    those images. Use as a context manager: leaving without `finalize()` keeps the partial.
    """

    def __init__(self, path: str | Path, meta: ArtifactMeta, *, resume: bool = True,
                 order: Sequence[str] | None = None, inputs: Iterable[str | Path] = ()) -> None:
        self.path = Path(path)
        self.meta = meta
        self.partial_path = _sibling(self.path, PARTIAL_SUFFIX)
        self.journal_path = _sibling(self.path, JOURNAL_SUFFIX)
        sources = [p["path"] for p in meta.parents if isinstance(p, dict) and "path" in p]
        check_output_path(self.path, inputs=[*sources, *inputs])
        self.done_ids: set[str] = set()
        self._unsynced: list[str] = []  # journal lines of images not flushed yet
        self._h5: Any = None
        self._file: _GuardedFile | None = None
        self._journal: IO[str] | None = None
        self._held = contextlib.ExitStack()
        self._held.enter_context(output_lock(self.path))
        try:
            previous = self._previous() if resume and self.partial_path.exists() else None
            self._start(previous, order)
        except BaseException:
            self._abort()
            raise

    # ------------------------------------------------------------------ starting and resuming

    def _previous(self) -> tuple[Any, dict[str, str]] | None:
        """(open old partial, its journal) to resume from, or None to start over."""
        import h5py

        from weaktr_cli.h5_probe import reads_without_crashing

        if not reads_without_crashing(self.partial_path):
            log.warning("%s is damaged (reading it crashed HDF5); starting over",
                        self.partial_path)
            return None
        try:
            h5 = h5py.File(self.partial_path, "r")
        except H5_ERRORS as exc:
            log.warning("%s cannot be read (%s); starting over", self.partial_path,
                        str(exc).splitlines()[0])
            return None
        try:
            previous = read_root_meta(h5, self.partial_path)
            group = h5.get(previous.kind)
            count = 0 if group is None else len(group)
        except (WeakTrError, *H5_ERRORS) as exc:
            h5.close()
            log.warning("%s is damaged (%s); starting over", self.partial_path,
                        str(exc).splitlines()[0])
            return None
        settings, journal = self._read_journal()
        wanted = _settings_digest(self.meta)
        if _settings_digest(previous) != wanted:
            h5.close()
            if settings == wanted:
                # The journal says this run wrote it: the file's own record is what is damaged.
                log.warning("%s is damaged (its settings no longer match its journal's); "
                            "starting over", self.partial_path)
                return None
            raise WeakTrError(
                f"{self.partial_path} is an unfinished artifact of other content or other "
                f"settings ({previous.kind}, {previous.dataset}/{previous.split}, "
                f"{json.dumps(previous.config, sort_keys=True)})",
                hint=NO_RESUME_HINT,
            )
        if count and not journal:
            log.warning("%s has no journal of verified images (%s missing); starting over",
                        self.partial_path, self.journal_path.name)
        return h5, journal

    def _read_journal(self) -> tuple[str | None, dict[str, str]]:
        """(the settings digest of its header, {image id: sha256} in writing order); a torn
        last line is ignored, and a journal without a header (or none) has settings None."""
        entries: dict[str, str] = {}
        try:
            lines = self.journal_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return None, entries
        settings = _journal_header(lines[0]) if lines else None
        for line in lines[1:] if settings is not None else lines:
            try:
                image_id, digest = json.loads(line)
            except (ValueError, TypeError):
                break
            if not (isinstance(image_id, str) and isinstance(digest, str)):
                break
            entries[image_id] = digest
        return settings, entries

    def _start(self, previous: tuple[Any, dict[str, str]] | None,
               order: Sequence[str] | None) -> None:
        """Write a fresh partial file (kept entries first) and put it in place."""
        import h5py

        new_partial = _sibling(self.partial_path, NEW_SUFFIX)
        new_journal = _sibling(self.journal_path, NEW_SUFFIX)
        try:
            self._file = _GuardedFile(new_partial)
            self._journal = open(new_journal, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise write_error(new_partial, exc) from exc
        self._journal.write(json.dumps({"settings": _settings_digest(self.meta)}) + "\n")
        self._journal.flush()
        self._h5 = h5py.File(self._file, "w")
        write_meta(self._h5, self.meta)
        # track_order: readers iterate entries in the order they were written (dataset order).
        self._group = self._h5.create_group(self.meta.kind, track_order=True)
        if previous is not None:
            old, journal = previous
            with old:
                self._keep_verified(old, journal, order)
        os.replace(new_partial, self.partial_path)
        os.replace(new_journal, self.journal_path)

    def _keep_verified(self, old: Any, journal: dict[str, str],
                       order: Sequence[str] | None) -> None:
        group = old.get(self.meta.kind)
        for image_id in order if order is not None else list(journal):
            digest = journal.get(image_id)
            if digest is None or group is None:
                return
            try:
                encoded = load_entry(group, image_id)
            except H5_ERRORS as exc:
                problem = f"cannot be read ({type(exc).__name__})"
            else:
                if entry_digest(image_id, encoded) == digest:
                    self._store(image_id, encoded, digest)
                    continue
                problem = "does not match what was written"
            log.warning("%s: image %r %s; keeping the %d images before it and redoing the rest",
                        self.partial_path, image_id, problem, len(self.done_ids))
            return

    # ---------------------------------------------------------------------------- writing

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.done_ids

    def write(self, image_id: str, entry: Entry) -> None:
        """Add one image's entry (a `CamRecord` or an (H, W) label map, as the kind needs)."""
        self._store(image_id, encode_entry(self.meta.kind, image_id, entry))

    def write_cams(self, image_id: str, class_ids: Any, maps: Any) -> None:
        """Add one image's CAMs: maps (K, H, W) float in [0, 1], class_ids (K,) ints."""
        self._store(image_id, encode_cams(image_id, class_ids, maps))

    def write_labels(self, image_id: str, label: Any) -> None:
        """Add one image's (H, W) uint8 label map (255 = ignore)."""
        self._store(image_id, encode_labels(label))

    def _store(self, image_id: str, encoded: Encoded, digest: str | None = None) -> None:
        if self._h5 is None or self._journal is None:
            raise ValueError(f"{self.path}: the writer is closed")
        if image_id in self.done_ids:
            raise ValueError(f"image {image_id!r} is written twice")
        store_entry(self._group, image_id, encoded)
        self._unsynced.append(json.dumps([image_id, digest or entry_digest(image_id, encoded)]))
        self.done_ids.add(image_id)
        if len(self.done_ids) % SYNC_EVERY == 0:
            self._sync()

    def _sync(self) -> None:
        """Flush the partial file, then journal the images that flush stored."""
        if self._h5 is None or self._journal is None:
            raise ValueError(f"{self.path}: the writer is closed")
        self._h5.flush()
        self._check_io()
        try:
            self._journal.write("".join(line + "\n" for line in self._unsynced))
            self._journal.flush()
        except OSError as exc:
            self._abort()
            raise write_error(self.journal_path, exc) from exc
        self._unsynced.clear()

    def _check_io(self) -> None:
        error = self._file.error if self._file is not None else None
        if error is not None:
            self._abort()
            raise write_error(self.partial_path, error)

    # ---------------------------------------------------------------------------- finishing

    def finalize(self) -> Path:
        """Close, fsync and atomically move the partial file to the final path."""
        self._sync()  # a publish that fails leaves a partial file its journal vouches for
        self._h5.attrs["created"] = now_iso()
        self._h5.close()
        self._h5 = None
        self._check_io()
        self._close_files()
        try:
            publish(self.partial_path, self.path)
        except OSError as exc:
            self._abort()
            raise write_error(self.path, exc) from exc
        self.journal_path.unlink(missing_ok=True)
        self._held.close()
        return self.path

    def _close_files(self) -> None:
        if self._h5 is not None:
            with contextlib.suppress(*H5_ERRORS):
                self._h5.close()
            self._h5 = None
        for handle in (self._file, self._journal):
            if handle is not None:
                with contextlib.suppress(OSError):
                    handle.close()
        self._file = self._journal = None

    def _abort(self) -> None:
        """Close everything and release the lock; the partial file stays for a resume."""
        self._close_files()
        self._held.close()

    def close(self) -> None:
        """Close without finishing; the partial file stays for a later resume, its images
        all journaled unless writing failed."""
        if self._h5 is not None and self._unsynced and not (self._file and self._file.error):
            with contextlib.suppress(WeakTrError, *H5_ERRORS):
                self._sync()
        self._abort()

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _settings_digest(meta: ArtifactMeta) -> str:
    """sha256 of what a resumed run must share with the partial file (content, settings,
    inputs): a partial file is continued only when its digest is the run's. The journal's
    header keeps it too, so a damaged partial is told from another run's."""
    record = [meta.kind, meta.dataset, meta.split, list(meta.class_names), meta.config,
              [p.get("sha256") for p in meta.parents]]
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _journal_header(line: str) -> str | None:
    """The settings digest of a journal's first line, or None when it is not a header."""
    try:
        header = json.loads(line)
    except ValueError:
        return None
    settings = header.get("settings") if isinstance(header, dict) else None
    return settings if isinstance(settings, str) else None


#: Makes the entries of the ids it is given, in that order: (image id, entry) pairs.
Producer = Callable[[list[str]], Iterator[tuple[str, Entry]]]


def write_artifact(
    out_path: str | Path,
    meta: ArtifactMeta,
    ids: Sequence[str],
    produce: Producer,
    *,
    resume: bool = True,
    inputs: Iterable[str | Path] = (),
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """The one per-image loop of every phase: entries of `ids`, in order, into `out_path`.

    Ids kept from a resumable partial file are skipped; `produce(todo)` makes the others.
    `progress(n_done, n_total)` is called before the first image and after each one. On an
    error or Ctrl-C the partial file stays for a resume and nothing is written at `out_path`.
    Returns the final path.
    """
    with ArtifactWriter(out_path, meta, resume=resume, order=ids, inputs=inputs) as writer:
        todo = [i for i in ids if i not in writer.done_ids]
        done = len(ids) - len(todo)
        if progress is not None:
            progress(done, len(ids))
        entries = produce(todo)
        try:
            for image_id, entry in entries:
                writer.write(image_id, entry)
                done += 1
                if progress is not None:
                    progress(done, len(ids))
        finally:
            close = getattr(entries, "close", None)
            if close is not None:  # stop a generator's workers now, not when it is collected
                close()
        return writer.finalize()


#: Config keys that differ between the shards of one run, or that a merge adds.
_MERGE_KEYS = ("shard", "merged_shards", "merged_parents")


def _settings(meta: ArtifactMeta) -> dict[str, Any]:
    return {k: v for k, v in meta.config.items() if k not in _MERGE_KEYS}


def _check_mergeable(readers: list[ArtifactReader]) -> None:
    first = readers[0]
    for reader in readers[1:]:
        if not reader.meta.same_content_as(first.meta):
            raise WeakTrError(
                f"{reader.path} does not match {first.path}: kind, dataset, split "
                "and class names must be equal to merge"
            )
        mine, theirs = _settings(first.meta), _settings(reader.meta)
        if mine != theirs or reader.meta.seed != first.meta.seed:
            keys = sorted(k for k in {*mine, *theirs} if mine.get(k) != theirs.get(k))
            differ = ", ".join(f"{k}: {mine.get(k)!r} vs {theirs.get(k)!r}" for k in keys[:3])
            if reader.meta.seed != first.meta.seed:
                differ = ", ".join(filter(None, [differ, f"seed: {first.meta.seed} vs "
                                                          f"{reader.meta.seed}"]))
            raise WeakTrError(
                f"{reader.path} was made with other settings than {first.path} ({differ})",
                hint="merge only the shards of one run (the same command with another --shard)",
            )


def merge_artifacts(
    inputs: list[Path], out_path: Path, *, order: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Merge shard artifacts of one run (same kind, dataset, split, classes, settings, seed).

    Entries keep the order of `order` when given (e.g. the dataset's ids), else shard order.
    Duplicate ids across shards are an error. The result records the shards as its parents,
    their `--shard` values under `config["merged_shards"]` and the shards' own parents (the
    checkpoint, the CAMs) under `config["merged_parents"]`.
    """
    if not inputs:
        raise WeakTrError("nothing to merge: no input artifacts given")
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(open_artifact(p)) for p in inputs]
        _check_mergeable(readers)
        owner: dict[str, ArtifactReader] = {}
        for reader in readers:
            for image_id in reader.ids:
                if image_id in owner:
                    raise WeakTrError(
                        f"image {image_id!r} is in both {owner[image_id].path} and {reader.path}"
                    )
                owner[image_id] = reader
        ids = [i for i in order if i in owner] if order is not None else list(owner)
        first = readers[0].meta
        grand = [p for r in readers for p in r.meta.parents]
        config = {**_settings(first), "shard": None,
                  "merged_shards": [r.meta.config.get("shard") for r in readers],
                  "merged_parents": [p for i, p in enumerate(grand) if p not in grand[:i]]}
        meta = new_meta(first.kind, first.dataset, first.split, first.class_names,
                        seed=first.seed, config=config, parents=inputs,
                        data_root=first.data_root or None)

        def produce(todo: list[str]) -> Iterator[tuple[str, Entry]]:
            for image_id in todo:
                yield image_id, owner[image_id].read(image_id)

        return write_artifact(out_path, meta, ids, produce, resume=False, inputs=inputs,
                              progress=progress)
