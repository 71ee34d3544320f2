"""The one exception type for bad data, and how its messages are worded.

Every problem a user can fix in their data or dictionary ends up as a
``DataError`` whose message names where the problem is (dataset, file,
record) and what to do about it, so entry points can print it without a
traceback and exit non-zero.
"""
from __future__ import annotations


class DataError(ValueError):
    """A problem in the user's data or dataset dictionary, with its fix in the message."""


def where(dataset: str | None = None, file: str | None = None, record: int | str | None = None) -> str:
    """Format the location of a problem, e.g. ``dataset 'demo', file a.jsonl, record 12``."""
    parts = []
    if dataset is not None:
        parts.append(f"dataset '{dataset}'")
    if file is not None:
        parts.append(f"file {file}")
    if record is not None:
        parts.append(f"record {record}")
    return ", ".join(parts) if parts else "<unknown location>"
