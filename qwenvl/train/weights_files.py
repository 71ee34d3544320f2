"""Whether a model folder's weights are whole, from their headers and sizes alone.

A download or copy cut off part way (or a Git LFS pointer left where the weights should be)
leaves a ``model.safetensors`` that only fails when ``from_pretrained`` opens it: a
``SafetensorError`` traceback after the data work, with ``run_args.json`` already written.
Its header says how long every tensor is, so a damaged file is told by reading that header and
the file's size; no tensor is read.  ``safetensors.safe_open`` (which maps the file and checks
the header against its length, as loading does) confirms every file judged whole.

``pytorch_model.bin`` files (``torch.save``'s zip archive) are judged by their zip directory: it
sits at the end of the file, so a file cut short has none, and each entry's offset and size must
fit the file.  A base model given as a Hub id is checked in the snapshot folder of the local
Hugging Face cache that ``from_pretrained`` reads offline (``snapshot_folder``).
"""
from __future__ import annotations

import json
import os

SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX = "pytorch_model.bin.index.json"
_LFS_POINTER = b"version https://git-lfs"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors refuses longer headers ("header too large")


def _lfs_pointer(size: int) -> str:
    return f"is a Git LFS pointer ({size:,} bytes), not the weights (the LFS objects were never fetched)"


def safetensors_problem(path: str) -> str | None:
    """What is wrong with the safetensors file at ``path`` (a phrase to follow its name), or None when it is whole."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            start = f.read(len(_LFS_POINTER))
            if start == _LFS_POINTER:
                return _lfs_pointer(size)
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


def torch_file_problem(path: str) -> str | None:
    """What is wrong with the ``torch.save`` file at ``path`` (a phrase to follow its name), or None when it looks whole.

    Only the zip format torch has written since 1.6 is judged; an older (pickle) file is left to its loader.
    """
    import zipfile

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            start = f.read(len(_LFS_POINTER))
        if start == _LFS_POINTER:
            return _lfs_pointer(size)
        if not start.startswith(b"PK\x03\x04"):
            if start[:1] == b"\x80":
                return None  # a legacy pickle (protocol byte first): left to its loader
            return (f"is neither a torch.save zip archive nor a pickle ({size:,} bytes: empty, or another file "
                    "saved under its name?)")
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    except zipfile.BadZipFile:
        # The zip directory is written last, at the end: a file cut short lost it.
        return f"is cut short ({size:,} bytes, its zip directory at the end is missing: an interrupted download or copy)"
    end = max((entry.header_offset + entry.compress_size for entry in entries), default=0)
    if end > size:
        return f"is cut short: {size:,} bytes, its zip directory describes at least {end:,}"
    return None


def snapshot_folder(model_id: str, cache_dir: str | None = None) -> str | None:
    """The folder of the local Hugging Face cache that ``from_pretrained(model_id)`` reads offline, or None.

    The snapshot the cache's ``refs/main`` points at (where ``config.json`` was read from); its files
    are links into ``blobs/``.
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        config = try_to_load_from_cache(model_id, "config.json", cache_dir=cache_dir)
    except (HFValidationError, ValueError):
        return None  # not a Hub id (a local path that does not exist, say)
    return os.path.dirname(config) if isinstance(config, str) else None


def model_weights_problems(folder: str, fetchable: bool = False) -> list[str]:
    """``"<file> <what is wrong>"`` for every damaged weights file ``from_pretrained`` would read in ``folder``.

    As transformers, the first present of ``model.safetensors``, ``model.safetensors.index.json`` (its shards),
    ``pytorch_model.bin`` and ``pytorch_model.bin.index.json`` (its shards) is what loads.  ``fetchable``: the
    folder is a cached snapshot and the Hub is reachable, so a shard absent from it is downloaded, not a problem
    (a damaged one stays: a file already in the cache is used as it is).
    """
    for name, check in ((SAFE_WEIGHTS, safetensors_problem), (SAFE_WEIGHTS_INDEX, safetensors_problem),
                        (TORCH_WEIGHTS, torch_file_problem), (TORCH_WEIGHTS_INDEX, torch_file_problem)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".index.json"):
            return _shard_problems(folder, name, check, fetchable)
        problem = check(path)
        return [f"{path} {problem}"] if problem else []
    return []


def _shard_problems(folder: str, index_name: str, check, fetchable: bool) -> list[str]:
    index = os.path.join(folder, index_name)
    try:
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return [f"{index} cannot be read as a shard index ({type(err).__name__}: {err})"]
    problems = []
    for shard in shards:
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            if not fetchable:
                problems.append(f"{path} is missing (named in {index_name})")
            continue
        problem = check(path)
        if problem:
            problems.append(f"{path} {problem}")
    return problems
