"""Multi-process runs need the length cache built beforehand.

Packing and length grouping read every sample's length from the cache
(``qwenvl.data.batch.length_cache``).  When it is missing, rank 0 counts every record while the
other ranks wait in a barrier; on a large dataset that outlasts the distributed
timeout (``--ddp_timeout``, 30 minutes) and every other rank fails with a timeout
that says nothing about lengths.  So a run of several processes whose missing cache
covers more than ``inline_count_limit()`` records stops at once with the exact
``qwenvl.tools.audit`` command that builds it (in parallel, over all the machine's
cores, and checking every record on the way).  Fewer records are counted inline on
rank 0, as is every cache of a single-process run: counting reads image headers, not
pixels, so the limit's worth takes minutes, far inside the timeout, and stopping a
first run on a small dataset would only cost the user a command.
"""
from __future__ import annotations

import dataclasses
import os
import shlex

from qwenvl.data.arguments import DataArguments
from qwenvl.data.batch.count import TokenCounter
from qwenvl.data.batch.length_cache import load_lengths
from qwenvl.data.errors import DataError


# Records a multi-process run may count inline on rank 0 (QWENVL_INLINE_LENGTH_COUNT overrides).
INLINE_COUNT_LIMIT = 20_000


def inline_count_limit(environ=os.environ) -> int:
    """How many uncached records a multi-process run counts inline before it stops with the audit command."""
    value = environ.get("QWENVL_INLINE_LENGTH_COUNT")
    return INLINE_COUNT_LIMIT if value in (None, "") else int(value)


def datasets_without_length_cache(dataset) -> list[tuple[str, int]]:
    """(name, records) of the mixture's datasets whose length cache for this renderer is absent or stale."""
    counter = TokenCounter.for_renderer(dataset.renderer)
    missing, seen = [], set()
    for entry, source in zip(dataset.entries, dataset.sources):
        key = (entry.spec.annotation_path, entry.spec.data_path)
        if key in seen:
            continue
        seen.add(key)
        if load_lengths(entry.spec, counter, len(source)) is None:
            missing.append((entry.spec.name, len(source)))
    return missing


def audit_command(explicit: dict, model_name_or_path: str, model_max_length: int | None) -> str:
    """The ``qwenvl.tools.audit`` command line that counts (and caches) lengths under the run's data flags."""
    data_flags = {f.name for f in dataclasses.fields(DataArguments)}
    parts = ["python", "-m", "qwenvl.tools.audit", "--model_name_or_path", str(model_name_or_path)]
    if model_max_length:
        parts += ["--model_max_length", str(model_max_length)]
    for key, value in explicit.items():
        if key in data_flags and value is not None:
            parts += [f"--{key}", ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def require_length_cache(dataset, explicit: dict, model_name_or_path: str, model_max_length: int | None,
                         world_size: int) -> None:
    """Raise a DataError naming the audit command when several processes would wait on rank 0 counting
    more than ``inline_count_limit()`` records; fewer are counted inline by the caller."""
    if world_size <= 1:
        return
    missing = datasets_without_length_cache(dataset)
    records = sum(n for _, n in missing)
    if not missing or records <= inline_count_limit():
        return
    names = ", ".join(name for name, _ in missing)
    raise DataError(f"no length cache for {names} ({records} records; packing and length grouping need every "
                    f"sample's length). With {world_size} processes the other ranks would wait while rank 0 counts "
                    "them, and past the distributed timeout (--ddp_timeout) they fail. Build the cache first, in "
                    f"parallel, then run the same training command again:\n  "
                    f"{audit_command(explicit, model_name_or_path, model_max_length)}")
