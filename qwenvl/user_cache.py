"""The user cache folder of qwenvl: ``$XDG_CACHE_HOME/qwenvl/<kind>`` (default ``~/.cache``).

One definition for every cache that cannot live next to its data (annotation indexes and
length caches of read-only data folders, audit reports, built tokenizers).
"""
from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(kind: str) -> Path:
    """The folder for caches of ``kind`` ("index", "lengths", "audit", "tokenizers"); not created here."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "qwenvl" / kind
