"""What ``--bad_sample_policy skip`` does with a bad sample: log it, leave it out, and
stand in for it when it leaves a micro-batch empty.

A skipped item comes out of the dataset as ``Skipped`` instead of a sample.  The
collators drop it; if every item of a micro-batch was skipped (always the case at
``--per_device_train_batch_size 1``), the batch is made from a stand-in: the first
item after the skipped one (``index + 1, index + 2, ...`` around the dataset) that
renders.  The choice depends only on the index, so it is the same on every rank and
after a resume, and every rank still takes its step: DDP and ZeRO-3 wait for all
ranks at every step, and one rank without a batch would hang the others.

Each skipped sample is written once per process to ``skipped_samples.jsonl`` in the
output folder, or ``skipped_samples.rank<R>.jsonl`` per rank when there are several
(dataloader workers of one rank append to its file; ranks never share one).  The
training log's ``skipped_samples`` counts distinct items over every rank.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from qwenvl.data.errors import DataError

logger = logging.getLogger(__name__)

# How far a stand-in is looked for: past this many bad neighbours in a row the data is
# mostly bad, and the run stops naming it rather than searching the whole dataset.
MAX_STAND_IN_TRIES = 64


def skip_log_path(output_dir: str, rank: int | None = None, world_size: int | None = None) -> str:
    """The skipped-samples file of this process's rank (``RANK`` / ``WORLD_SIZE`` from torchrun by default)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    name = "skipped_samples.jsonl" if world_size <= 1 else f"skipped_samples.rank{rank}.jsonl"
    return os.path.join(output_dir, name)


@dataclass
class SkipLog:
    """Where skipped samples are counted and written (one JSON line each, once per sample and process)."""

    path: str | None = None
    counts: dict = field(default_factory=dict)  # DataKind value -> skips in this process
    seen: set = field(default_factory=set)  # distinct item indices skipped in this process

    def record(self, index: int, origin: str, reason: str, kind: str | None = None) -> None:
        kind = kind or "bad_sample"  # the DataError's kind (a DataKind value), not words of its message
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if index in self.seen:
            return
        self.seen.add(index)
        # A DataError's message already starts with its location: say it once.
        logger.warning("skipping bad sample %s", reason if reason.startswith(origin) else f"{origin}: {reason}")
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({"index": int(index), "origin": origin, "reason": reason, "pid": os.getpid()}) + "\n")

    def skipped_indices(self) -> set[int]:
        """Distinct items skipped by this rank: its file (dataloader workers write there), else this process's."""
        if self.path and os.path.exists(self.path):
            found = set()
            with open(self.path) as f:
                for line in f:
                    try:
                        found.add(int(json.loads(line)["index"]))
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut off by a killed worker
            return found
        return set(self.seen)


@dataclass(frozen=True)
class Skipped:
    """A dataset item the skip policy left out; ``stand_in()`` renders its replacement."""

    index: int
    dataset: object = field(repr=False, compare=False)

    def stand_in(self):
        """The first item after ``index`` that renders (a sample dict, or ``{"pack": [...]}``)."""
        n = len(self.dataset)
        for step in range(1, min(n, MAX_STAND_IN_TRIES + 1)):
            item = self.dataset[(self.index + step) % n]
            if not isinstance(item, Skipped):
                return item
        tried = min(n - 1, MAX_STAND_IN_TRIES)
        raise DataError(f"item {self.index} ({self.dataset.origin(self.index)}) was skipped as bad and none of the "
                        f"{tried} items after it renders either: the data is mostly bad. Run python -m "
                        "qwenvl.tools.audit with the same flags to list every problem.")
