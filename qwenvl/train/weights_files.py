"""Whether a model folder's safetensors weights are whole, from their headers and sizes alone.

A download or copy cut off part way (or a Git LFS pointer left where the weights should be)
leaves a ``model.safetensors`` that only fails when ``from_pretrained`` opens it: a
``SafetensorError`` traceback after the data work, with ``run_args.json`` already written.
Its header says how long every tensor is, so a damaged file is told by reading that header and
the file's size; no tensor is read.  ``safetensors.safe_open`` (which maps the file and checks
the header against its length, as loading does) confirms every file judged whole.
"""
from __future__ import annotations

import json
import os

SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
_LFS_POINTER = b"version https://git-lfs"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors refuses longer headers ("header too large")


def safetensors_problem(path: str) -> str | None:
    """What is wrong with the safetensors file at ``path`` (a phrase to follow its name), or None when it is whole."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            start = f.read(len(_LFS_POINTER))
            if start == _LFS_POINTER:
                return f"is a Git LFS pointer ({size:,} bytes), not the weights (the LFS objects were never fetched)"
            if size < 8:
                return f"is {size:,} bytes, too short for a safetensors header (empty or cut off at once)"
            length = int.from_bytes(start[:8], "little")
            if length > _MAX_HEADER:
                return "does not start with a safetensors header (an error page or another file saved under its name?)"
            if 8 + length > size:
                return f"is cut short inside its header ({size:,} bytes; the header alone takes {8 + length:,})"
            f.seek(8)
            header = json.loads(f.read(length))
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    except (ValueError, UnicodeDecodeError) as err:
        return f"has a safetensors header that is not valid JSON ({err})"
    if not isinstance(header, dict):
        return "has a safetensors header that is not a JSON object"
    ends = [entry.get("data_offsets", [0, 0])[1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict)]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return (f"is cut short: {size:,} bytes of the {expected:,} its header describes "
                f"({expected - size:,} missing, an interrupted download or copy)")
    if size > expected:
        return f"is {size - expected:,} bytes longer than the {expected:,} its header describes"
    return _safe_open_problem(path)


def _safe_open_problem(path: str) -> str | None:
    # The loader's own check (offsets in order, each tensor's bytes matching its dtype and shape): cheap,
    # it maps the file and reads only the header.
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy"):
            return None
    except (SafetensorError, OSError) as err:
        return f"cannot be opened by safetensors ({err})"


def model_weights_problems(folder: str) -> list[str]:
    """``"<file> <what is wrong>"`` for every damaged weights file ``from_pretrained`` would read in ``folder``.

    As transformers, a folder's ``model.safetensors`` is read when present, else the shards its
    ``model.safetensors.index.json`` names.  Other formats (``pytorch_model.bin``) are left to their loader.
    """
    single = os.path.join(folder, SAFE_WEIGHTS)
    if os.path.isfile(single):
        problem = safetensors_problem(single)
        return [f"{single} {problem}"] if problem else []
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX)
    if not os.path.isfile(index):
        return []
    try:
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return [f"{index} cannot be read as a shard index ({type(err).__name__}: {err})"]
    problems = []
    for shard in shards:
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            problems.append(f"{path} is missing (named in {SAFE_WEIGHTS_INDEX})")
            continue
        problem = safetensors_problem(path)
        if problem:
            problems.append(f"{path} {problem}")
    return problems
