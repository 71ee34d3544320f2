"""Training's check of each rendered sample against its row in the length cache.

Packing and length grouping plan micro-batches from cached lengths
(``qwenvl.data.batch.length_cache``); rendering measures the same sample again with
pixels.  The two share one renderer and one fit rule, and the cache key covers what
changes a count, so they agree; this check is what tells when they do not (a stale
cache, an edited media file whose annotation file did not change, a bug):

* every mismatch is counted per dataset; the first of each dataset is logged as a
  warning with the fix (rebuild the cache: ``python -m qwenvl.tools.audit`` with the
  run's flags, or delete the cache files named), and again at 10, 100, 1000... with
  the count so far (counts are per process: each dataloader worker counts its own);
* under a token budget (online packing), a sample that renders *longer* than its row
  (more tokens, visual tokens or vision patches) is refused as bad data
  (``DataKind.STALE_LENGTH``, handled by ``--bad_sample_policy``): the sampler packed it
  by its row, and taking it would put the micro-batch over its budget without a word.
  A sample shorter than its row only leaves room unused.
"""
from __future__ import annotations

import logging

import numpy as np

from qwenvl.data.batch.length_cache import PATCHES, TOKENS, VISUAL
from qwenvl.data.errors import DataError, DataKind

logger = logging.getLogger(__name__)

__all__ = ["LengthCheck", "rendered_row"]

_COLUMNS = {TOKENS: "tokens", VISUAL: "visual tokens", PATCHES: "vision patches"}


def rendered_row(item: dict, image_pad: int, video_pad: int) -> tuple[int, int, int]:
    """``(tokens, visual_tokens, vision_patches)`` of a rendered sample (or the sum over a pack),
    the columns of a length-cache row."""
    samples = item["pack"] if "pack" in item else [item]
    tokens = visual = patches = 0
    for s in samples:
        ids = s["input_ids"]
        tokens += int(ids.shape[0])
        visual += int(((ids == image_pad) | (ids == video_pad)).sum())
        for key in ("pixel_values", "pixel_values_videos"):
            if s.get(key) is not None:
                patches += int(s[key].shape[0])
    return tokens, visual, patches


class LengthCheck:
    """Compare rendered samples with the rows the sampler planned with.

    ``rows``: the (len(dataset), 3) table the sampler was built from; ``refuse_longer``:
    whether a budget is in force (online packing), so that a sample longer than its row
    must not be taken; ``fix``: the sentence that says how to rebuild the cache;
    ``columns``: the columns the sampler was given (token counts alone leave the others 0).
    """

    def __init__(self, rows, refuse_longer: bool, fix: str, columns: tuple[int, ...] = (TOKENS, VISUAL, PATCHES)):
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        self.refuse_longer = refuse_longer
        self.fix = fix
        self.columns = tuple(columns)
        self.mismatches: dict[str, int] = {}  # dataset name -> mismatched samples seen by this process

    def check(self, index: int, row: tuple[int, int, int], dataset: str, origin: str) -> None:
        """Count and report a mismatch of item ``index``; raise ``DataError`` (``STALE_LENGTH``)
        when it is longer than its row under a budget."""
        cached = tuple(int(x) for x in self.rows[index])
        if all(row[c] == cached[c] for c in self.columns):
            return
        count = self.mismatches[dataset] = self.mismatches.get(dataset, 0) + 1
        diff = ", ".join(f"{_COLUMNS[c]} {row[c]} (cached {cached[c]})" for c in self.columns if row[c] != cached[c])
        if count == 1 or _power_of_ten(count):
            logger.warning("dataset %r: %d sample(s) so far render to other lengths than the length cache says "
                           "(the latest: %s: %s). Packing and grouping planned with the cached lengths. %s",
                           dataset, count, origin, diff, self.fix)
        longer = any(row[c] > cached[c] for c in self.columns)
        if self.refuse_longer and longer:
            raise DataError(f"{origin}: renders to {diff}: longer than the length cache says, so the micro-batch "
                            f"it was packed into would exceed its token budget. {self.fix}", DataKind.STALE_LENGTH)


def _power_of_ten(n: int) -> bool:
    while n % 10 == 0:
        n //= 10
    return n == 1
