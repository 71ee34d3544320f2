"""Multi-process runs need the length cache built beforehand.

Packing and length grouping read every sample's length from the cache
(``qwenvl.data.lengths``).  When it is missing, rank 0 counts every record while the
other ranks wait in a barrier; on a large dataset that outlasts the distributed
timeout (``--ddp_timeout``, 30 minutes) and every other rank fails with a timeout
that says nothing about lengths.  So a run of several processes with a missing cache
stops at once with the exact ``qwenvl.tools.audit`` command that builds it (in
parallel, over all the machine's cores, and checking every record on the way); a
single-process run still builds it inline, as there is no one to wait.
"""
from __future__ import annotations

import dataclasses
import shlex

from qwenvl.data.arguments import DataArguments
from qwenvl.data.errors import DataError


def datasets_without_length_cache(dataset) -> list[str]:
    """Names of the mixture's datasets whose length cache for this renderer is absent or stale."""
    from qwenvl.data.lengths import TokenCounter, load_lengths

    counter = TokenCounter.for_renderer(dataset.renderer)
    missing, seen = [], set()
    for entry, source in zip(dataset.entries, dataset.sources):
        key = (entry.spec.annotation_path, entry.spec.data_path)
        if key in seen:
            continue
        seen.add(key)
        if load_lengths(entry.spec, counter, len(source)) is None:
            missing.append(entry.spec.name)
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
    """Raise a DataError naming the audit command when several processes would wait on rank 0 counting lengths."""
    if world_size <= 1:
        return
    missing = datasets_without_length_cache(dataset)
    if not missing:
        return
    raise DataError(f"no length cache for {', '.join(missing)} (packing and length grouping need every sample's "
                    f"length). With {world_size} processes the other ranks would wait while rank 0 counts them, "
                    "and past the distributed timeout (--ddp_timeout) they fail. Build the cache first, in "
                    f"parallel, then run the same training command again:\n  "
                    f"{audit_command(explicit, model_name_or_path, model_max_length)}")
