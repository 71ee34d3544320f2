"""The per-file length cache: its on-disk format, loading, building and the per-item lengths of a run.

The cache keeps one row per record of an annotation file: ``[tokens, visual_tokens,
vision_patches]`` at full resolution (``BAD`` in every column for a record that cannot
be rendered; the reason and its kind are kept in the meta file), counted by
``qwenvl.data.batch.count``.  It lives next to the annotation file as
``<annotation>.lengths.<key>.npy`` + ``.json``, or under ``$XDG_CACHE_HOME/qwenvl/lengths``
(default ``~/.cache``) when that folder is not writable.  ``key`` is
``qwenvl.data.batch.length_key.lengths_key``: a cache that no longer matches is never found,
so it is rebuilt (in parallel: ``qwenvl.data.batch.parallel_map``).  ``model_max_length``
is *not* part of the key: the rows stay valid for every budget, and the few records
above a given budget are recounted exactly (shrunk, or marked bad) when the table is
loaded for it.

Training checks each rendered sample against its row (``SupervisedDataset.expect_lengths``):
a cache that is wrong anyway is reported, and never packs a micro-batch over its budget.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from qwenvl.data.batch.count import TokenCounter, measure_record
from qwenvl.data.batch.length_key import lengths_key
from qwenvl.data.batch.parallel_map import chunk_ranges, parallel_chunks
from qwenvl.data.catalog.registry import DatasetSpec
from qwenvl.data.errors import DataKind
from qwenvl.data.media.read import is_url
from qwenvl.data.media.video import video_settings_from
from qwenvl.data.render.processor_settings import configure_processor
from qwenvl.user_cache import user_cache_dir

logger = logging.getLogger(__name__)

__all__ = ["TOKENS", "VISUAL", "PATCHES", "BAD", "LengthTable", "cache_paths", "load_lengths", "save_lengths",
           "build_lengths", "fit_to_max_length", "lengths_for", "load_or_build_lengths", "dataset_lengths"]

TOKENS, VISUAL, PATCHES = 0, 1, 2  # columns of a length table
BAD = -1  # every column of a record that cannot be rendered


def _cache_root() -> Path:
    return user_cache_dir("lengths")


@dataclass
class LengthTable:
    """Lengths of every record of one annotation file: ``rows`` (n, 3) int64 and the bad records' reasons."""

    rows: np.ndarray
    errors: dict[int, str]
    path: str | None = None  # where it was loaded from or saved to
    kinds: dict[int, str] = dataclasses.field(default_factory=dict)  # bad record -> DataKind value

    @property
    def tokens(self) -> np.ndarray:
        return self.rows[:, TOKENS]

    @classmethod
    def from_results(cls, results: Iterable[tuple]) -> "LengthTable":
        """From ``(row, reason)`` or ``(row, reason, kind)`` per record (``row`` None when bad)."""
        rows, errors, kinds = [], {}, {}
        for i, (row, error, *kind) in enumerate(results):
            if row is None:
                errors[i] = error or "unknown problem"
                kinds[i] = (kind[0] if kind and kind[0] else DataKind.MALFORMED.value)
                rows.append((BAD, BAD, BAD))
            else:
                rows.append(row)
        return cls(np.asarray(rows, dtype=np.int64).reshape(-1, 3), errors, kinds=kinds)



def _measure_chunk(state, task):
    source, spec, counter = state
    start, stop = task
    return [measure_record(source, spec, i, counter) for i in range(start, stop)]


def cache_paths(spec: DatasetSpec, counter: TokenCounter) -> list[Path]:
    """Where the cache of ``spec`` under ``counter``'s settings may be (the files to delete to rebuild it)."""
    return _cache_candidates(spec.annotation_path, lengths_key(spec, counter)[0])


def _cache_candidates(annotation_path: str, key: str) -> list[Path]:
    """Where a cache may live: next to the annotation file, then the user cache folder."""
    ann = annotation_path.rstrip("/")
    name = f"{os.path.basename(ann)}.lengths.{key}.npy"
    digest = hashlib.sha1(os.path.abspath(ann).encode("utf-8")).hexdigest()[:16]
    fallback = _cache_root() / f"{digest}-{name}"
    if is_url(ann):
        return [fallback]
    return [Path(os.path.dirname(os.path.abspath(ann))) / name, fallback]


def _meta_path(npy: Path) -> Path:
    return npy.with_suffix(".json")


def load_lengths(spec: DatasetSpec, counter: TokenCounter, records: int | None = None) -> LengthTable | None:
    """The cached table of ``spec`` for ``counter``'s settings, or None (absent, stale, unreadable)."""
    key, _ = lengths_key(spec, counter)
    for path in _cache_candidates(spec.annotation_path, key):
        try:
            meta = json.loads(_meta_path(path).read_text())
            rows = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            continue
        ok = (meta.get("key") == key and rows.dtype == np.int64 and rows.ndim == 2 and rows.shape[1] == 3
              and rows.shape[0] == meta.get("records") and (records is None or rows.shape[0] == records))
        if ok:
            return LengthTable(rows, {int(k): v for k, v in meta.get("errors", {}).items()}, str(path),
                               {int(k): v for k, v in meta.get("kinds", {}).items()})
        logger.info("ignoring the length cache %s: it does not match its file", path)
    return None


def _remove_stale(directory: Path, prefix: str, keep: Path, stamp: dict) -> None:
    """Delete caches of the same annotation file built from an older version of it."""
    try:
        candidates = list(directory.glob(f"{prefix}.lengths.*.json"))
    except OSError:
        return
    for meta_path in candidates:
        if meta_path == _meta_path(keep):
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("stamp") != stamp:
            for p in (meta_path, meta_path.with_suffix(".npy")):
                try:
                    p.unlink()
                except OSError:
                    pass


def save_lengths(spec: DatasetSpec, counter: TokenCounter, table: LengthTable, seconds: float | None = None) -> Path | None:
    """Write ``table`` to the cache (next to the annotation file, else the user cache); returns the path."""
    key, meta = lengths_key(spec, counter)
    meta.update(key=key, records=int(table.rows.shape[0]), columns=["tokens", "visual_tokens", "vision_patches"],
                errors={str(k): v for k, v in sorted(table.errors.items())},
                kinds={str(k): v for k, v in sorted(table.kinds.items())}, built_s=seconds)
    for path in _cache_candidates(spec.annotation_path, key):
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp_meta = path.with_name(f"{path.name}.{os.getpid()}.json.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(table.rows, dtype=np.int64))
            tmp_meta.write_text(json.dumps(meta, indent=1))
            # The rows first, then the meta that vouches for them: a reader that finds
            # the meta finds matching rows (both renames are atomic).
            os.replace(tmp, path)
            os.replace(tmp_meta, _meta_path(path))
        except OSError:
            for p in (tmp, tmp_meta):
                try:
                    p.unlink()
                except OSError:
                    pass
            continue
        prefix = path.name.split(".lengths.")[0]
        _remove_stale(path.parent, prefix, path, meta["stamp"])
        table.path = str(path)
        return path
    logger.warning("could not write the length cache of %s anywhere; it will be rebuilt next time",
                   spec.annotation_path)
    return None


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # local: only a progress bar needs it, and tqdm.auto probes for notebooks
    return tqdm(total=total, desc=desc, unit="rec", leave=False)


def build_lengths(spec: DatasetSpec, source, counter: TokenCounter, num_workers: int = 0, chunk: int = 64,
                  progress: bool = True) -> LengthTable:
    """Count every record of ``source`` at full resolution (no max length), in parallel."""
    full = counter.with_max_length(None)
    bar = _progress(len(source), f"lengths {spec.name}", progress)
    results = parallel_chunks(_measure_chunk, (source, spec, full), chunk_ranges(len(source), chunk), num_workers,
                              on_result=(lambda t, r: bar.update(len(r))) if bar else None)
    if bar:
        bar.close()
    return LengthTable.from_results(r for chunk_results in results for r in chunk_results)


def fit_to_max_length(table: LengthTable, spec: DatasetSpec, source, counter: TokenCounter,
                      model_max_length: int | None) -> LengthTable:
    """The table as rendered under ``model_max_length``: rows above it recounted (shrunk, or bad)."""
    if model_max_length is None:
        return table
    over = np.flatnonzero(table.rows[:, TOKENS] > model_max_length)
    if over.size == 0:
        return table
    rows, errors, kinds = table.rows.copy(), dict(table.errors), dict(table.kinds)
    exact = counter.with_max_length(model_max_length)
    for i in over.tolist():
        row, error, kind = measure_record(source, spec, i, exact)
        if row is None:
            rows[i] = BAD
            errors[i] = error
            kinds[i] = kind
        else:
            rows[i] = row
    return LengthTable(rows, errors, table.path, kinds)


def lengths_for(spec: DatasetSpec, source, counter: TokenCounter, num_workers: int = 0,
                progress: bool = True, rebuild: bool = False) -> LengthTable:
    """The table of ``spec`` under ``counter`` (its max length applied), from the cache or built and cached."""
    table = None if rebuild else load_lengths(spec, counter, len(source))
    if table is None:
        start = time.perf_counter()
        table = build_lengths(spec, source, counter, num_workers, progress=progress)
        save_lengths(spec, counter, table, round(time.perf_counter() - start, 3))
    return fit_to_max_length(table, spec, source, counter, counter.model_max_length)


def load_or_build_lengths(spec: DatasetSpec, source, processor, data_args, num_workers: int = 0,
                          model_max_length: int | None = None, progress: bool = True) -> np.ndarray:
    """(n_records, 3) int64 ``[tokens, visual_tokens, vision_patches]`` of every record of ``spec``.

    ``spec`` is a ``DatasetSpec`` (or a ``MixtureEntry``), ``source`` its open
    ``AnnotationSource``; ``processor`` is configured from ``data_args`` first (as
    training does).  Rows of records that cannot be rendered are ``BAD`` (-1).
    """
    spec = getattr(spec, "spec", spec)
    configure_processor(processor, data_args)
    counter = TokenCounter(processor, video_settings_from(data_args, processor), model_max_length,
                           thinking=getattr(data_args, "enable_thinking", "auto"))
    return lengths_for(spec, source, counter, num_workers, progress).rows


def dataset_lengths(dataset, num_workers: int = 0, progress: bool = True) -> tuple[np.ndarray, dict[int, str]]:
    """Per-item lengths of a ``SupervisedDataset`` (its mixture order), and the bad items' reasons.

    Returns ``(rows, bad)``: ``rows`` is (len(dataset), 3) int64 as in
    ``load_or_build_lengths``, under the renderer's settings and max length; ``bad``
    maps item index -> reason for items that cannot be rendered (their rows are BAD).
    """
    counter = TokenCounter.for_renderer(dataset.renderer)
    tables = [lengths_for(entry.spec, source, counter, num_workers, progress)
              for entry, source in zip(dataset.entries, dataset.sources)]
    mixture = np.asarray(dataset.mixture, dtype=np.int64).reshape(-1, 2)
    rows = np.full((mixture.shape[0], 3), BAD, dtype=np.int64)
    bad: dict[int, str] = {}
    for d, table in enumerate(tables):
        items = np.flatnonzero(mixture[:, 0] == d)
        rows[items] = table.rows[mixture[items, 1]]
        for item in items[rows[items, TOKENS] < 0].tolist():
            bad[item] = table.errors.get(int(mixture[item, 1]), "unknown problem")
    return rows, bad
