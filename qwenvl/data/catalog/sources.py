"""Lazy, lean random access to annotation files: JSONL, JSON arrays, saved HF datasets.

``open_annotations(path)`` returns an ``AnnotationSource``: ``len(src)`` and
``src[i]`` (the raw record as stored: a dict, or a list of dicts for packed
files). Nothing is parsed up front. For JSONL and JSON arrays the index is one
numpy int64 array of byte offsets (8 bytes per record), built by scanning the
file in binary chunks with numpy; a record is parsed only when it is read.
A saved HF dataset (``Dataset.save_to_disk``) is memory-mapped Arrow already.

Indexes of large files are cached in a sidecar ``<file>.idx.npy`` keyed by the
file's size and mtime, or under ``$XDG_CACHE_HOME/qwenvl/index`` (default
``~/.cache/qwenvl/index``) when the data folder is read-only.

File handles are opened lazily and reopened after ``fork``, so one source can be
built in the main process and used from every DataLoader worker.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from qwenvl.data.errors import DataError, DataKind, Origin, where
from qwenvl.data.media.read import is_url
from qwenvl.user_cache import user_cache_dir

logger = logging.getLogger(__name__)

__all__ = ["AnnotationSource", "open_annotations", "scan_jsonl", "scan_json_array"]

CHUNK_BYTES = 1 << 20  # larger chunks were slower (CPU cache) and raise peak memory
# Below this size a scan takes a few milliseconds: not worth a file next to the user's data.
CACHE_MIN_BYTES = 4 << 20

_WS = b" \t\r\n"
_BOM = b"\xef\xbb\xbf"
_BACKSLASH, _NEWLINE = 92, 10
_IS_WS = np.zeros(256, dtype=bool)
_IS_WS[list(_WS)] = True
# Byte classes for the JSON-array scanner (0: uninteresting), applied with bytes.translate.
_C_QUOTE, _C_BACKSLASH, _C_OPEN, _C_CLOSE, _C_COMMA = 1, 2, 3, 4, 5
_CLASS_TABLE = bytearray(256)
for _byte, _cls in ((b'"', _C_QUOTE), (b"\\", _C_BACKSLASH), (b"[", _C_OPEN), (b"{", _C_OPEN),
                    (b"]", _C_CLOSE), (b"}", _C_CLOSE), (b",", _C_COMMA)):
    _CLASS_TABLE[_byte[0]] = _cls
_CLASS_TABLE = bytes(_CLASS_TABLE)
_CLASS_STEP = np.array([0, 0, 0, 1, -1, 0], dtype=np.int64)  # depth change per class

_MAGIC = 0x5157454E49445831  # "QWENIDX1"
_INDEX_VERSION = 1
_KINDS = {"jsonl": 1, "json": 2}


# --------------------------------------------------------------------------- scanners

def scan_jsonl(chunks: Iterator[bytes], read_range=None) -> np.ndarray:
    """Byte offsets of the non-blank lines of a JSONL stream, plus the total size last.

    ``chunks`` yields the file's bytes in order. Record ``i`` is the bytes
    ``offsets[i]:offsets[i+1]`` (its line, then any blank lines). Lines whose first
    byte is whitespace are rare; only those are re-read with ``read_range(start, n)``
    to decide whether they are blank, so the common case stays vectorised.
    """
    starts, candidates = [np.zeros(1, dtype=np.int64)], []
    base = 0
    first_byte_pending = True  # the line starting at `base` has its first byte in this chunk
    for chunk in chunks:
        a = np.frombuffer(chunk, dtype=np.uint8)
        if first_byte_pending and a.size:
            if _IS_WS[a[0]]:
                candidates.append(np.array([base], dtype=np.int64))
            first_byte_pending = False
        nl = np.flatnonzero(a == _NEWLINE)
        if nl.size:
            local = nl + 1
            starts.append(local + base)
            inside = local < a.size
            ws_first = np.zeros(local.size, dtype=bool)
            ws_first[inside] = _IS_WS[a[local[inside]]]
            candidates.append(local[ws_first] + base)
            # A line starting exactly at the chunk's end gets its first byte checked next chunk.
            first_byte_pending = not inside[-1]
        base += a.size
    offsets = np.concatenate(starts)
    offsets = offsets[offsets < base]  # drop the empty "line" after a final newline
    offsets = np.append(offsets, base)
    cand = np.concatenate(candidates) if candidates else np.zeros(0, dtype=np.int64)
    cand = cand[cand < base]
    if cand.size and read_range is not None:
        pos = np.searchsorted(offsets, cand)
        blank = [i for i, p in zip(pos.tolist(), cand.tolist())
                 if not read_range(p, int(offsets[i + 1] - p)).strip(_WS)]
        if blank:
            offsets = np.delete(offsets, blank)
    return offsets


def _escaped_quotes(ev: np.ndarray, kind: np.ndarray, q_idx: np.ndarray,
                    carry: int) -> np.ndarray:
    """Which quote events are escaped: preceded by an odd run of backslashes.

    ``ev``/``kind`` are the positions/classes of the chunk's interesting bytes,
    ``q_idx`` the indices of the quote events, ``carry`` the length of the backslash
    run that ended the previous chunk. Works on events only, never the whole chunk.
    """
    pos = ev[q_idx]
    prev = q_idx - 1
    has_prev = prev >= 0
    cand = np.zeros(q_idx.size, dtype=bool)
    p = prev[has_prev]
    cand[has_prev] = (kind[p] == _C_BACKSLASH) & (ev[p] == pos[has_prev] - 1)
    at_start = pos == 0  # only the carried run can precede a quote at byte 0
    cand |= at_start & (carry > 0)
    escaped = np.zeros(q_idx.size, dtype=bool)
    ci = np.flatnonzero(cand)
    if ci.size == 0:
        return escaped
    bs_ev = np.flatnonzero(kind == _C_BACKSLASH)
    bs_pos = ev[bs_ev]
    new_run = np.concatenate(([True], np.diff(bs_pos) != 1)) if bs_pos.size else bs_pos
    run_start = np.maximum.accumulate(np.where(new_run, bs_pos, -1)) if bs_pos.size else bs_pos
    run = np.full(ci.size, carry, dtype=np.int64)  # quotes at byte 0: the carried run only
    inner = ~at_start[ci]
    if inner.any():
        m = np.searchsorted(bs_ev, prev[ci[inner]])  # the backslash just before the quote
        rs = run_start[m]
        run[inner] = pos[ci[inner]] - rs + np.where(rs == 0, carry, 0)
    escaped[ci] = (run & 1) == 1
    return escaped


def scan_json_array(chunks: Iterator[bytes], name: str = "<stream>") -> np.ndarray:
    """Offsets of the top-level elements of a JSON array, in one streaming pass.

    Each chunk is mapped with ``bytes.translate`` to byte classes (quote, backslash,
    opener, closer, comma, other); numpy then works on the few interesting positions:
    quote parity (with backslash escapes, carried across chunk boundaries) marks
    what is inside strings, and a cumulative sum of the brackets outside strings
    gives the depth. Returns ``sep + 1`` for each top-level separator (the opening
    ``[``, each depth-1 comma, the closing ``]``): element ``i`` is the bytes
    ``offsets[i]:offsets[i+1]-1``. Raises DataError if the brackets do not balance.
    """
    seps: list[np.ndarray] = []
    in_string, carry, depth, base = 0, 0, 0, 0
    opened = closed = False
    for chunk in chunks:
        classes = np.frombuffer(chunk.translate(_CLASS_TABLE), dtype=np.uint8)
        ev = np.flatnonzero(classes)
        kind = classes[ev]
        toggle = (kind == _C_QUOTE).view(np.uint8)
        q_idx = np.flatnonzero(toggle)
        if q_idx.size:
            toggle = toggle.copy()
            toggle[q_idx[_escaped_quotes(ev, kind, q_idx, carry)]] = 0
        parity = np.bitwise_xor.accumulate(toggle) ^ in_string if ev.size else toggle
        s_idx = np.flatnonzero((kind >= _C_OPEN) & (parity == 0))
        if s_idx.size:
            s = ev[s_idx]
            step = _CLASS_STEP[kind[s_idx]]
            after = depth + np.cumsum(step)
            before = after - step
            for t in np.flatnonzero((before == 0) | (after < 0)).tolist():
                ch = chr(chunk[s[t]])
                if closed or after[t] < 0 or ch != "[" or opened:
                    raise DataError(
                        f"file {name}: unexpected '{ch}' at byte {base + int(s[t])} outside the "
                        "top-level array. Fix: the file must hold exactly one JSON array "
                        "[record, record, ...] (or use JSONL, one record per line).", DataKind.INVALID_JSON)
                opened = True
            closing = (after == 0) & (step == -1)
            at_top = ((before == 1) & (step == 0)) | ((before == 0) & (step == 1)) | closing
            seps.append(s[at_top] + base)
            closed = closed or bool(closing.any())
            depth = int(after[-1])
        if ev.size:
            in_string = int(parity[-1])
        i = len(chunk)
        while i > 0 and chunk[i - 1] == _BACKSLASH:
            i -= 1
        carry = carry + len(chunk) if i == 0 else len(chunk) - i
        base += len(chunk)
    if not closed:
        reason = "inside a string" if in_string else f"with {depth} bracket(s) still open"
        raise DataError(f"file {name}: the JSON array ends {reason} (the file is truncated or "
                        "not valid JSON). Fix: repair or regenerate the file.", DataKind.INVALID_JSON)
    sep = np.concatenate(seps) if seps else np.zeros(0, dtype=np.int64)
    return sep.astype(np.int64) + 1


# --------------------------------------------------------------------------- readers


def _parses(raw: bytes) -> bool:
    """True when ``raw`` is valid JSON."""
    try:
        json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return True


class _Reader:
    """Reads byte ranges of one local file or fsspec URL; reopens after fork, pickles cleanly."""

    def __init__(self, path: str):
        self.path = path
        self.remote = is_url(path)
        self._handle: Any = None
        self._pid = -1

    def __getstate__(self):
        return {"path": self.path, "remote": self.remote, "_handle": None, "_pid": -1}

    def _open(self):
        # A handle inherited through fork shares its file position with the parent: reopen.
        if self._handle is None or self._pid != os.getpid():
            if self.remote:
                import fsspec  # local: only remote annotation files need it
                self._handle = fsspec.open(self.path, "rb").open()
            else:
                self._handle = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._handle

    def close(self) -> None:
        # Only the process that opened the handle closes it; a forked copy just forgets it.
        if self._handle is not None and self._pid == os.getpid():
            if self.remote:
                self._handle.close()
            else:
                os.close(self._handle)
        self._handle = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing useful to do
            pass

    def read(self, start: int, n: int) -> bytes:
        h = self._open()
        if not self.remote and hasattr(os, "pread"):
            return os.pread(h, n, start)  # no shared file position: safe across threads
        if self.remote:
            h.seek(start)
            return h.read(n)
        os.lseek(h, start, os.SEEK_SET)
        return os.read(h, n)

    def chunks(self, size: int | None = None) -> Iterator[bytes]:
        size = size or CHUNK_BYTES  # read at call time so tests can shrink it
        if self.remote:
            import fsspec  # local: only remote annotation files need it
            with fsspec.open(self.path, "rb") as f:
                while chunk := f.read(size):
                    yield chunk
        else:
            with open(self.path, "rb", buffering=0) as f:
                while chunk := f.read(size):
                    yield chunk

    def stat(self) -> tuple[int, int]:
        """(size, mtime in ns) — the key that tells a cached index is stale."""
        if self.remote:
            import fsspec  # local: only remote annotation files need it
            fs, p = fsspec.core.url_to_fs(self.path)
            info = fs.info(p)
            return int(info.get("size") or 0), 0
        st = os.stat(self.path)
        return st.st_size, st.st_mtime_ns

    def line_of(self, offset: int) -> int:
        """1-based line number of a byte offset (only used to word errors)."""
        n, seen = 1, 0
        for chunk in self.chunks():
            take = chunk[: max(0, offset - seen)]
            n += take.count(b"\n")
            seen += len(chunk)
            if seen >= offset:
                break
        return n


# --------------------------------------------------------------------------- index cache

def _cache_dir() -> Path:
    return user_cache_dir("index")


def _index_paths(path: str) -> list[Path]:
    """Where the index of ``path`` may live: next to it first, then the user cache."""
    digest = hashlib.sha1(os.path.abspath(path).encode("utf-8")).hexdigest()[:16]
    return [Path(path + ".idx.npy"), _cache_dir() / f"{digest}-{Path(path).name}.idx.npy"]


def _load_index(path: str, kind: str, size: int, mtime: int) -> np.ndarray | None:
    want = [_MAGIC, _INDEX_VERSION, size, mtime, _KINDS[kind]]
    for p in _index_paths(path):
        try:
            arr = np.load(p, allow_pickle=False)
        except (OSError, ValueError):
            continue
        if arr.dtype == np.int64 and arr.ndim == 1 and arr[:5].tolist() == want:
            return arr[5:]
    return None


def _save_index(path: str, kind: str, size: int, mtime: int, offsets: np.ndarray) -> Path | None:
    header = np.array([_MAGIC, _INDEX_VERSION, size, mtime, _KINDS[kind]], dtype=np.int64)
    data = np.concatenate([header, offsets])
    for p in _index_paths(path):
        tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.save(f, data)
            os.replace(tmp, p)  # atomic: another rank never reads half a file
            return p
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass
    logger.warning("could not cache the index of %s anywhere; it will be rebuilt next time", path)
    return None


# --------------------------------------------------------------------------- sources

class AnnotationSource:
    """Random access to the raw records of one annotation file (see ``open_annotations``)."""

    path: str
    kind: str  # "jsonl" | "json" | "hf"
    is_packed: bool

    def __len__(self) -> int:
        raise NotImplementedError

    def _get(self, i: int) -> Any:
        raise NotImplementedError

    def __getitem__(self, i: int) -> Any:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"record {i} out of range for {self.path} ({n} records)")
        return self._get(i)

    def __iter__(self):
        for i in range(len(self)):
            yield self._get(i)

    def __repr__(self) -> str:
        packed = ", packed" if self.is_packed else ""
        return f"{type(self).__name__}({self.path!r}, {self.kind}, {len(self)} records{packed})"


class OffsetSource(AnnotationSource):
    """JSONL or JSON-array file read through a byte-offset index; parses a record on access."""

    def __init__(self, path: str, kind: str, offsets: np.ndarray, reader: _Reader):
        self.path, self.kind, self.offsets, self._reader = path, kind, offsets, reader
        self.is_packed = len(self) > 0 and self._raw(0).lstrip(_WS + _BOM)[:1] == b"["

    def __len__(self) -> int:
        return max(0, self.offsets.size - 1)

    def _raw(self, i: int) -> bytes:
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        if self.kind == "json":
            stop -= 1  # drop the separator (',' or the closing ']')
        return self._reader.read(start, stop - start)

    def _get(self, i: int) -> Any:
        raw = self._raw(i)
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            line = self._reader.line_of(int(self.offsets[i])) + _error_line(raw, e) - 1
            detail = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            fix = "correct or delete that record"
            if isinstance(e, UnicodeDecodeError):  # a file saved in Latin-1 / Windows-1252 (accented text)
                fix = (f"the file is not UTF-8; convert it, e.g. iconv -f WINDOWS-1252 -t UTF-8 {self.path} > "
                       f"{self.path}.utf8 (with the encoding it was written in)")
            if self.kind == "jsonl" and raw.rstrip(_WS).endswith(b",") and _parses(raw.rstrip(_WS)[:-1]):
                # JSON "Extra data" says nothing a user recognises: the line is a record plus a comma.
                detail, fix = "a comma after the record", "delete it (JSONL is one record per line, no commas between)"
            raise DataError(
                f"{where(file=self.path, record=i)} (line {line}) is not valid JSON: {detail}. "
                f"Fix: {fix}.", DataKind.INVALID_JSON, Origin(file=self.path, record=i,
                                                                                    line=line)) from None
        want = list if self.is_packed else dict
        if not isinstance(record, want):
            shape = "a list of samples (the file is packed)" if self.is_packed else "a JSON object"
            raise DataError(f"{where(file=self.path, record=i)}: expected {shape}, got "
                            f"{type(record).__name__}. Fix: a file holds either records or packed "
                            "lists of records, not a mix.", DataKind.INVALID_JSON)
        return record


# What PIL raises on bytes that are not a (whole) image: UnidentifiedImageError and "image file is
# truncated" are OSErrors; corrupt headers raise SyntaxError or ValueError; DecompressionBombError.
_UNDECODABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _raised_by_pil(exc: BaseException) -> bool:
    """True when PIL raised ``exc`` (an image's bytes), not pyarrow or datasets (the saved files, or a bug)."""
    tb = exc.__traceback__
    while tb is not None:
        if f"{os.sep}PIL{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


class HFSource(AnnotationSource):
    """A dataset saved with ``datasets.Dataset.save_to_disk``; rows are records, images are PIL."""

    kind = "hf"
    is_packed = False

    def __init__(self, path: str):
        import datasets  # local: a heavy import (pyarrow), needed only for saved HF datasets
        self.path = path
        self.dataset = datasets.load_from_disk(path)

    def __len__(self) -> int:
        return len(self.dataset)

    def _get(self, i: int) -> Any:
        try:
            return _without_struct_nulls(self.dataset[i])
        except _UNDECODABLE as exc:
            # ``datasets`` decodes a row's Image columns (PIL open + load) as the row is read, so bytes
            # that are not an image, or are cut short, fail here, before any of our media checks.
            if not _raised_by_pil(exc):
                raise
            raise DataError(f"{where(file=self.path, record=i)}: an image of this row does not decode "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Fix: the "
                            "stored image bytes are corrupt or not an image; re-encode that image or drop the row.",
                            DataKind.BAD_IMAGE, Origin(file=self.path, record=i)) from None


_TURN_LISTS = ("messages", "conversations", "prompt", "completion")


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _without_struct_nulls(row: dict) -> dict:
    """``row`` with the nulls Arrow adds inside ``tools`` and ``tool_calls`` removed.

    Arrow gives every row of a column one struct type: a key that any row's tool schema or call
    arguments have appears in every other row as null (``"properties": {"city": ..., "zone": null}``),
    and the chat template would write those nulls into the tool descriptions and the trained calls.
    Arrow cannot tell such a null from a written one; a dataset that needs nulls there stores
    ``tools`` / ``arguments`` as JSON strings (as TRL advises), which are left as they are.
    """
    if not isinstance(row, dict):
        return row
    row = dict(row)
    if isinstance(row.get("tools"), list):
        row["tools"] = _drop_nulls(row["tools"])
    for key in _TURN_LISTS:
        turns = row.get(key)
        if isinstance(turns, list) and any(isinstance(t, dict) and t.get("tool_calls") for t in turns):
            row[key] = [{**t, "tool_calls": _drop_nulls(t["tool_calls"])}
                        if isinstance(t, dict) and t.get("tool_calls") else t for t in turns]
    return row


# Byte order marks of the encodings JSON files are sometimes saved in by mistake (Windows tools, PowerShell's
# ">" redirection). UTF-32's come first: UTF-32-LE's mark starts with UTF-16-LE's.
_OTHER_ENCODINGS = ((b"\xff\xfe\x00\x00", "UTF-32LE"), (b"\x00\x00\xfe\xff", "UTF-32BE"),
                    (b"\xff\xfe", "UTF-16LE"), (b"\xfe\xff", "UTF-16BE"))


def _check_utf8(reader: _Reader, path: str) -> None:
    """Refuse, once for the whole file, an annotation file in UTF-16 or UTF-32: read as UTF-8 every one
    of its records would be reported invalid on its own, without the cause."""
    head = reader.read(0, 4)
    encoding = next((name for bom, name in _OTHER_ENCODINGS if head.startswith(bom)), None)
    if encoding is None and len(head) >= 2 and b"\x00" in head[:2]:
        # No mark, but ASCII "[" or "{" next to a zero byte: UTF-16 (or UTF-32) text.
        encoding = "UTF-16LE" if head[1:2] == b"\x00" else "UTF-16BE"
    if encoding is not None:
        raise DataError(f"file {path}: is {encoding} text, not UTF-8 (JSON annotation files must be UTF-8). Fix: "
                        f"convert it, e.g. iconv -f {encoding} -t UTF-8 {path} > {Path(path).stem}.utf8"
                        f"{Path(path).suffix}, or write it with encoding='utf-8'.", DataKind.INVALID_JSON)


def _first_byte(reader: _Reader) -> bytes:
    for chunk in reader.chunks(1 << 16):
        chunk = chunk.lstrip(_WS + _BOM) if chunk else chunk
        if chunk:
            return chunk[:1]
    return b""


def _open_hf(path: str) -> AnnotationSource:
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        splits = sorted(p.name for p in Path(path).iterdir() if p.is_dir())
        raise DataError(f"{path} is a saved DatasetDict with splits {splits}. Fix: set "
                        f"annotation_path to one split folder, e.g. {os.path.join(path, 'train')}.", DataKind.CONFIG)
    if not os.path.exists(os.path.join(path, "state.json")):
        raise DataError(f"{path} is a folder but not a dataset saved with save_to_disk (no "
                        "state.json). Fix: point annotation_path at a .json/.jsonl file or at "
                        "the folder written by Dataset.save_to_disk.", DataKind.CONFIG)
    return HFSource(path)


# Files users download or keep compressed, recognised by their first bytes, with the command that makes
# them readable here (the generic "neither '[' nor '{'" named a byte, not the file's format).
_BINARY_FORMATS = {
    b"PAR1": ("a Parquet file (as Hugging Face Hub datasets are stored)",
              ("python -c \"import datasets; datasets.Dataset.from_parquet('{p}').save_to_disk('{p}.hf')\" and set "
               "annotation_path to {p}.hf")),
    b"\x1f\x8b": ("gzip-compressed", "decompress it (gunzip -k {p}) and point annotation_path at the result"),
    b"\x28\xb5\x2f\xfd": ("zstd-compressed", "decompress it (zstd -d {p}) and point annotation_path at the result"),
}


def _binary_format(head: bytes, path: str) -> str | None:
    """What a known binary file is and how to convert it, from its first bytes; None otherwise."""
    for magic, (what, fix) in _BINARY_FORMATS.items():
        if head.startswith(magic):
            return f"is {what}, not JSON or JSONL. Fix: {fix.format(p=path)}."
    return None


def open_annotations(path: str | os.PathLike, *, cache: bool | None = None) -> AnnotationSource:
    """Open an annotation file for random access, detecting its format.

    * a folder written by ``Dataset.save_to_disk`` -> rows (``kind == "hf"``);
    * ``*.jsonl`` or a file starting with ``{`` -> one record per line (``"jsonl"``);
    * a file starting with ``[`` -> a JSON array (``"json"``). If its items are
      lists the file is packed: ``is_packed`` is True and a record is a list of samples.

    ``cache``: keep the byte-offset index in a sidecar ``.idx.npy`` (None: only for
    files of at least ``CACHE_MIN_BYTES``). Local paths and fsspec URLs are accepted;
    remote indexes are rebuilt on every open.
    """
    path = os.fspath(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    remote = is_url(path)
    if not remote:
        if os.path.isdir(path):
            return _open_hf(path)
        if not os.path.isfile(path):
            raise DataError(f"annotation file not found: {path}. Fix: check annotation_path in "
                            "the dataset dictionary (relative paths resolve against its folder).", DataKind.CONFIG)
    reader = _Reader(path)
    _check_utf8(reader, path)
    known = _binary_format(reader.read(0, 4), path)  # before the name: a gzip file called x.jsonl too
    if known:
        raise DataError(f"file {path}: {known}", DataKind.INVALID_JSON)
    first = _first_byte(reader)
    if path.endswith(".jsonl") or first == b"{":
        kind = "jsonl"
    elif first == b"[":
        kind = "json"
    elif not first:
        kind = "jsonl"  # an empty file: zero records
    else:
        raise DataError(f"file {path}: starts with {first!r}, which is neither a JSON array "
                        "'[' nor a JSONL record '{'. Fix: write a JSON array of records or "
                        "one JSON object per line (.jsonl).", DataKind.INVALID_JSON)
    size, mtime = reader.stat()
    use_cache = (not remote) and (size >= CACHE_MIN_BYTES if cache is None else cache)
    offsets = _load_index(path, kind, size, mtime) if use_cache else None
    if offsets is None:
        if kind == "jsonl":
            offsets = scan_jsonl(reader.chunks(), reader.read)
        else:
            offsets = scan_json_array(reader.chunks(), path)
            _check_tail(reader, path, int(offsets[-1]), size)
            if offsets.size == 2 and not reader.read(int(offsets[0]), int(
                    offsets[1] - offsets[0] - 1)).strip(_WS):
                offsets = offsets[1:]  # "[]": the only "element" is whitespace
            else:
                _check_empty_elements(reader, path, offsets)
        if use_cache:
            _save_index(path, kind, size, mtime, offsets)
    source = OffsetSource(path, kind, offsets, reader)
    if kind == "jsonl" and first == b"{" and not path.endswith(".jsonl") and len(source):
        _check_single_object(source, path)
    return source


def _error_line(raw: bytes, err: Exception) -> int:
    """1-based line, within a record's bytes, of a parse error.

    A record's bytes end with its newline (JSONL) or the whitespace before the next
    separator (JSON arrays), and a record cut short at the end of its line fails at
    that trailing whitespace: ``json`` then names the next line.  The error is placed
    at the last non-blank character instead, the line the fix goes on.
    """
    if isinstance(err, json.JSONDecodeError):
        text = err.doc
        pos = min(err.pos, max(len(text.rstrip()) - 1, 0))
        return text.count("\n", 0, pos) + 1
    skipped = len(raw) - len(raw.lstrip(_WS))  # undecodable bytes: the record's first line
    return raw.count(b"\n", 0, skipped) + 1


# An element this short or shorter may be only whitespace; longer ones hold a record.
_BLANK_CANDIDATE_BYTES = 4096


def _check_empty_elements(reader: _Reader, path: str, offsets: np.ndarray) -> None:
    """Name a comma with nothing after it (``[{...}, {...},]``, ``{...},,{...}``) instead of a phantom record."""
    sizes = np.diff(offsets) - 1  # bytes between two separators
    for i in np.flatnonzero(sizes <= _BLANK_CANDIDATE_BYTES).tolist():
        start = int(offsets[i])
        if reader.read(start, int(sizes[i])).strip(_WS):
            continue
        last = i == len(sizes) - 1
        comma = start - 1 if last else start + int(sizes[i])  # the comma that has nothing before or after it
        line = reader.line_of(comma)
        if last:
            what = "a trailing comma after the last record"
        else:
            what = "an empty element (a comma with no record before it)" + (f", after record {i - 1}" if i else "")
        raise DataError(f"file {path}: {what} (line {line}, byte {comma}); "
                        "JSON allows no trailing or doubled commas. Fix: delete that comma.",
                        DataKind.INVALID_JSON, Origin(file=path, line=line))


def _check_tail(reader: _Reader, path: str, end: int, size: int) -> None:
    """Only whitespace may follow the closing bracket of the array."""
    while end < size:
        piece = reader.read(end, min(CHUNK_BYTES, size - end))
        if piece.strip(_WS):
            raise DataError(f"file {path}: extra data after the closing ']' at byte {end}. Fix: "
                            "the file must hold exactly one JSON array.", DataKind.INVALID_JSON)
        end += len(piece)


def _check_single_object(source: OffsetSource, path: str) -> None:
    """A ``.json`` file holding one pretty-printed object is not JSONL: say so clearly."""
    try:
        json.loads(source._raw(0))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"file {path}: the top level is a JSON object, not a list of records. "
                        "Fix: wrap the records in [...], or write one record per line and name "
                        "the file .jsonl.", DataKind.INVALID_JSON) from None
