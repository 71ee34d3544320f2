"""The length cache's key: everything that changes a record's token count, hashed.

A cached row is valid while none of these changed (``lengths_key``):

* the annotation file (size and mtime, or every file of a saved HF dataset folder; size
  and ETag of a URL) and the dataset's ``data_path`` and declared ``bbox_format``;
* the processor: its class, the tokenizer (a hash of the whole vocabulary, merges and
  added tokens), the chat template, the image and video processors' pixel bounds and
  patch, merge and temporal patch sizes; the thinking mode and the video settings;
* the code: the source of our modules that decide a count (``RULE_MODULES``: the
  renderer, the fit rule, the counter, media reading, video sampling and decoding) and
  the versions of the libraries that do (``LIBRARIES``: transformers and tokenizers,
  Pillow for image headers, the video decoders torchcodec, decord and PyAV; a library
  that is not installed counts as its absence, since ``--video_backend auto`` then
  decodes with another).

A cache whose key no longer matches is never found, so it is rebuilt.
``model_max_length`` is not part of the key: rows are counted at full resolution and
the few above a given budget are recounted when the table is loaded for it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from qwenvl.data.batch.count import TokenCounter
from qwenvl.data.catalog.registry import DatasetSpec
from qwenvl.data.media.read import is_url

__all__ = ["LENGTHS_VERSION", "RULE_MODULES", "LIBRARIES", "library_versions", "code_hash", "tokenizer_hash",
           "counter_settings", "lengths_key"]

# 2: the kind of each bad record is kept; only bad data is cached, never a bug.
# 3: labels built while rendering, literal special-token text tokenized as text.
# 4: decoder library versions in the key.
LENGTHS_VERSION = 4

# Our modules whose rules decide a sample's tokens (paths under qwenvl/data/): when any of
# them changes (an upgrade), cached lengths may be wrong, so their source is part of the key.
RULE_MODULES = ("batch/count.py", "render/fit.py", "render/sample.py", "render/chat_pieces.py",
                "render/piece_tokens.py", "render/prompt.py", "render/grounding.py", "catalog/formats.py",
                "catalog/conversation_checks.py", "media/read.py", "media/video.py", "media/video_decode.py",
                "media/video_checks.py")
# The distributions whose versions decide a count: the processor and tokenizer, image headers,
# and every video decoder --video_backend may use (frame counts and rates differ between them).
LIBRARIES = ("transformers", "tokenizers", "pillow", "torchcodec", "decord", "av")
_DATA_ROOT = Path(__file__).resolve().parents[1]  # qwenvl/data


def library_versions(names=LIBRARIES) -> dict[str, str | None]:
    """``{distribution: version}`` as installed now (``None`` when not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def code_hash() -> str:
    """A hash of the rule modules' source and the libraries' versions (read on every call: cheap,
    and a library installed during a session is seen)."""
    digest = hashlib.sha256(json.dumps(library_versions(), sort_keys=True).encode())
    for name in RULE_MODULES:
        # A missing file is our bug (a module moved without this list following), not a user's problem.
        digest.update((_DATA_ROOT / name).read_bytes())
    return digest.hexdigest()[:16]


# id(tokenizer) -> (weak reference to it, hash).  An id is reused once its object is freed, so
# an entry counts only while its reference still points at the very tokenizer asked about.
_TOKENIZER_HASHES: dict[int, tuple[Any, str]] = {}


def _tokenizer_text(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        return backend.to_str()
    return json.dumps(sorted(tokenizer.get_vocab().items()))


def tokenizer_hash(tokenizer) -> str:
    """A hash of the whole tokenizer (vocabulary, merges, added tokens), computed once per live object."""
    key = id(tokenizer)
    entry = _TOKENIZER_HASHES.get(key)
    if entry is not None and entry[0]() is tokenizer:
        return entry[1]
    digest = hashlib.sha256(_tokenizer_text(tokenizer).encode("utf-8")).hexdigest()[:16]
    try:
        # The callback drops the entry when the tokenizer is freed (its id may then be reused).
        ref = weakref.ref(tokenizer, lambda _ref, key=key: _TOKENIZER_HASHES.pop(key, None))
    except TypeError:  # an object without weak references: hashed on every call, never cached
        return digest
    _TOKENIZER_HASHES[key] = (ref, digest)
    return digest


def _file_stamp(path: str) -> dict:
    """Size and mtime of the annotation file (every file of a saved HF dataset folder)."""
    if is_url(path):
        import fsspec  # local: only URLs need it, and most runs read local files
        fs, p = fsspec.core.url_to_fs(path)
        info = fs.info(p)
        return {"size": int(info.get("size") or 0), "etag": str(info.get("ETag") or info.get("etag") or "")}
    if os.path.isdir(path):
        files = sorted(os.scandir(path), key=lambda e: e.name)
        return {"files": [[e.name, e.stat().st_size, e.stat().st_mtime_ns] for e in files if e.is_file()]}
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}



def _plain(value: Any) -> Any:
    """JSON-friendly copy of processor settings (tuples, numpy numbers...)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def counter_settings(counter: TokenCounter) -> dict:
    """Everything about the counter that changes a record's length (the cache key's settings part)."""
    processor = counter.processor
    image = processor.image_processor
    settings = {
        "code": code_hash(),  # our rules' source and the versions of the libraries that count
        "processor": type(processor).__name__,
        "tokenizer": [type(processor.tokenizer).__name__, len(processor.tokenizer), tokenizer_hash(processor.tokenizer)],
        "chat_template": hashlib.sha256(str(getattr(processor, "chat_template", "")).encode()).hexdigest()[:16],
        "thinking": counter.thinking,  # "false" drops reasoning; Qwen3.5 splits records per reasoning turn
        "image": {k: _plain(getattr(image, k, None))
                  for k in ("size", "min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size")},
    }
    video = getattr(processor, "video_processor", None)
    if video is not None:
        settings["video_processor"] = {k: _plain(getattr(video, k, None)) for k in (
            "size", "patch_size", "merge_size", "temporal_patch_size", "cap_pixels_per_frame", "max_video_tokens")}
    if counter.video_settings is not None:
        vs = dataclasses.asdict(counter.video_settings)
        for unrelated in ("timeout_s", "num_threads"):  # how decoding runs, not what it yields
            vs.pop(unrelated, None)
        settings["video"] = _plain(vs)
    return settings


def lengths_key(spec: DatasetSpec, counter: TokenCounter) -> tuple[str, dict]:
    """(key, meta) of the cache of ``spec``'s annotation file under ``counter``'s settings."""
    meta = {
        "version": LENGTHS_VERSION,
        "annotation_path": os.path.abspath(spec.annotation_path) if not is_url(spec.annotation_path)
        else spec.annotation_path,
        "data_path": spec.data_path,
        "stamp": _file_stamp(spec.annotation_path),
        # Converted box numbers change token counts: the family's convention and the declared format.
        "grounding": [getattr(counter.grounding, "convention", None), getattr(spec, "bbox_format", None)],
        # The dataset's thinking mode overrides the counter's (dropped reasoning, per-turn splits).
        "enable_thinking": getattr(spec, "enable_thinking", None),
        "settings": counter_settings(counter),
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    return key, meta
