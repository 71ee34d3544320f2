"""Turning ``--dataset_use`` entries into the list of (dataset, record) pairs of one epoch.

The official code subsampled with the unseeded ``random`` module, so every rank
(and every resume) could train on a different subset. Here the subset depends
only on the training seed and the dataset's name.
"""
from __future__ import annotations

import logging
import math
import zlib
from typing import Mapping, Sequence

import numpy as np

from qwenvl.data.catalog.registry import DatasetSpec, MixtureEntry
from qwenvl.data.errors import DataError

__all__ = ["MixtureEntry", "mixture_counts", "build_mixture", "mixture_string", "why_empty",
           "check_not_empty"]

logger = logging.getLogger(__name__)


def _split(rate: float, length: int) -> tuple[int, int]:
    """(full copies, size of the extra random subset) for ``rate`` of ``length`` records."""
    if rate < 0 or not math.isfinite(rate):
        raise ValueError(f"a mixture rate must be a finite number >= 0, got {rate!r}")
    full = math.floor(rate)
    # Round the total, not the fraction: 0.29 * 100 is 28.999... and must give 29.
    total = math.floor(rate * length + 0.5)
    return full, max(0, min(length, total - full * length))


def mixture_counts(entries: Sequence[MixtureEntry], lengths: Sequence[int]) -> list[int]:
    """Number of rows each entry contributes: round(rate * length)."""
    _check(entries, lengths)
    counts = []
    for entry, n in zip(entries, lengths):
        full, extra = _split(entry.rate, int(n))
        counts.append(full * int(n) + extra)
    return counts


def _check(entries, lengths) -> None:
    if len(entries) != len(lengths):
        raise ValueError(f"got {len(entries)} mixture entries but {len(lengths)} lengths")


def why_empty(entry: MixtureEntry, length: int) -> str:
    """Why ``entry`` contributes no rows to the mixture, in the user's terms."""
    name, path = entry.spec.name, entry.spec.annotation_path
    if length == 0:
        return f"dataset '{name}': its annotation file {path} holds no records"
    if entry.rate == 0:
        return f"dataset '{name}': its rate is 0 ({name}%0 in --dataset_use, or a sampling rate of 0 in the dictionary)"
    return (f"dataset '{name}': {entry.rate * 100:g}% of its {length} records rounds to 0 samples; "
            "raise its rate")


def check_not_empty(entries: Sequence[MixtureEntry], lengths: Sequence[int]) -> None:
    """Raise a DataError naming every dataset and why when the mixture has no rows (rate 0, an
    empty annotation file, a rate that rounds to 0); log a warning for each entry that alone adds
    nothing.  Training and the tools call it before building a sampler over the mixture (torch's
    own message for an empty one is ``num_samples should be a positive integer``)."""
    _check(entries, lengths)
    counts = mixture_counts(entries, lengths)
    empty = [why_empty(e, int(n)) for e, n, c in zip(entries, lengths, counts) if c == 0]
    if not empty:
        return
    if len(empty) == len(entries):
        raise DataError("the dataset mixture is empty, nothing to train on:\n  " + "\n  ".join(empty)
                        + "\nFix the annotation file or the rate in --dataset_use (name%percent).")
    for reason in empty:
        logger.warning("%s; it adds nothing to the mixture", reason)


def _rng(seed: int, name: str) -> np.random.Generator:
    # crc32, not hash(): Python's str hash is salted per process and would differ per rank.
    return np.random.default_rng([int(seed) % (1 << 64), zlib.crc32(name.encode("utf-8"))])


def build_mixture(entries: Sequence[MixtureEntry], lengths: Sequence[int],
                  seed: int) -> np.ndarray:
    """The epoch's rows as an int64 array of shape (N, 2): (dataset index, record index).

    A rate ``r`` of a dataset of ``n`` records gives ``floor(r)`` full copies plus
    a random subset (without replacement) of ``round(r * n) - floor(r) * n`` records,
    so 250% of 10 records is 20 rows from two copies plus 5 sampled ones. The subset
    comes from a numpy Generator seeded with (``seed``, crc32 of the dataset name):
    identical on every rank and after a resume, independent of the other entries.

    Ordering: entries in the given order; within one, the full copies in file order,
    then the sampled records in ascending file order. Nothing is shuffled here, on
    purpose: the Trainer's (seeded, distributed) sampler shuffles the whole mixture.
    """
    _check(entries, lengths)
    parts = []
    for d, (entry, n) in enumerate(zip(entries, lengths)):
        n = int(n)
        full, extra = _split(entry.rate, n)
        records = [np.tile(np.arange(n, dtype=np.int64), full)]
        if extra:
            picked = _rng(seed, entry.spec.name).choice(n, size=extra, replace=False)
            records.append(np.sort(picked).astype(np.int64))
        records = np.concatenate(records)
        parts.append(np.stack([np.full(records.size, d, dtype=np.int64), records], axis=1))
    if not parts:
        return np.zeros((0, 2), dtype=np.int64)
    return np.concatenate(parts)


def mixture_string(dictionary: Mapping[str, DatasetSpec]) -> str:
    """``name%P,...`` for every dataset, P = floor(rate * 100 + 0.5); ready for --dataset_use.

    Same output as ``jq -r 'to_entries | map("\\(.key)%\\((.value.repeat_time * 100 + 0.5)
    | floor)") | join(",")'`` (one line in the shell)
    except that the rate is sampling_rate or repeat_time, whichever is given, else 1.0.
    """
    return ",".join(f"{name}%{math.floor(spec.rate * 100 + 0.5)}"
                    for name, spec in dictionary.items())
