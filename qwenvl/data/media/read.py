"""Media references: resolving them against a dataset's data_path, reading them, opening images.

A media reference ("ref") is what a record names: a path relative to the
dataset's ``data_path``, an absolute path, an fsspec URL (``s3://``, ``gs://``,
``http(s)://``, ``file://`` ...), or, for HF datasets, an already decoded
``PIL.Image``. Media files are only ever read.

Every read is bounded by a time limit (``--media_timeout``), and every failure of
the user's bytes (missing, refused connection, no credentials, a FIFO, corrupt, a
shape the processor refuses) becomes a ``DataError`` with its ``DataKind`` and the
media path in its ``origin``.  Images are returned as they are displayed: EXIF
orientation applied, 16-bit grayscale scaled to 8 bits (not clipped to white), transparent pixels
composited onto white (as the Qwen processors serve them).
"""
from __future__ import annotations

import base64
import binascii
import functools
import io
import os
import re
import stat
import urllib.parse
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps

from qwenvl.data.errors import DataError, DataKind, Origin
from qwenvl.data.media.time_limit import DEFAULT_MEDIA_TIMEOUT_S, ReaderDied, run_with_timeout

__all__ = ["is_url", "lives_here", "resolve_media", "open_image", "image_header", "as_displayed", "read_url_bytes",
           "media_failure", "check_aspect_ratio", "MAX_ASPECT_RATIO", "DEFAULT_MEDIA_TIMEOUT_S"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
MAX_ASPECT_RATIO = 200  # the Qwen image processors' smart_resize raises a ValueError above this
_ORIENTATION = 0x0112  # the EXIF tag; values 5-8 turn the image a quarter, swapping width and height


def is_url(ref: Any) -> bool:
    """True for ``scheme://...`` strings (fsspec URLs, including ``file://``)."""
    return isinstance(ref, str) and bool(_URL.match(ref))


def resolve_media(ref: Any, data_path: str | None, origin: str = "") -> Any:
    """Resolve one media reference against ``data_path``.

    Relative paths are joined to ``data_path`` (with ``/`` when it is a URL);
    absolute paths, URLs and PIL images are returned unchanged; a list (the frames
    of one video) is resolved item by item. An HF ``Image`` value that was not
    decoded (``{"bytes": ..., "path": ...}``) and a ``data:`` URL (an image inline, base64) become
    PIL images (opened lazily; ``{"path"}`` alone is a path).  A
    relative path with no ``data_path`` is an error: it would otherwise depend on the
    folder the command runs from.
    """
    at = f"{origin}: " if origin else ""
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, (list, tuple)):
        return [resolve_media(r, data_path, origin) for r in ref]
    if isinstance(ref, dict) and ("bytes" in ref or "path" in ref):
        if ref.get("bytes"):
            try:
                return Image.open(io.BytesIO(ref["bytes"]))
            except Exception as exc:  # noqa: BLE001  whatever PIL raises on these bytes is the record's
                raise _bad_image(exc, "<image bytes in the record>", at) from None
        ref = ref.get("path")
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if isinstance(ref, str) and ref[:5].lower() == "data:":
        return _data_url_image(ref, at)
    if not isinstance(ref, str) or not ref:
        raise DataError(f"{at}a media reference must be a non-empty path or URL string, "
                        f"got {ref!r}. Fix: give the file name relative to data_path.")
    if is_url(ref) or os.path.isabs(ref):
        return ref
    if not data_path:
        raise DataError(f"{at}the media path {ref!r} is relative but the dataset has no data_path, so it "
                        "would depend on the folder the command runs from. Fix: set 'data_path' of this dataset in "
                        "the dataset dictionary to the folder holding the media (or use absolute paths).",
                        DataKind.CONFIG, Origin(media=ref))
    if is_url(data_path):
        return data_path.rstrip("/") + "/" + ref
    return os.path.join(data_path, ref)


def _data_url_image(ref: str, at: str) -> Image.Image:
    """The image inline in a ``data:`` URL (``data:image/png;base64,...``), opened lazily like an HF row's.

    OpenAI-style ``image_url`` parts carry images so; joined to ``data_path`` as a file name, they were
    reported as missing files.
    """
    header, comma, payload = ref[5:].partition(",")
    shown = ref[:40] + ("..." if len(ref) > 40 else "")
    try:
        if not comma:
            raise ValueError("no ',' before the data")
        data = (base64.b64decode(payload, validate=True) if header.lower().endswith(";base64")
                else urllib.parse.unquote_to_bytes(payload))
    except (ValueError, binascii.Error) as exc:
        raise DataError(f"{at}the data: URL {shown!r} does not hold base64 data ({exc}). Fix: write it as "
                        "data:image/<type>;base64,<base64 of the image file>, or save the image to a file and "
                        "name the file.", DataKind.BAD_IMAGE, Origin(media=shown)) from None
    try:
        return Image.open(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001  whatever PIL raises on these bytes is the record's
        raise DataError(f"{at}the data: URL {shown!r} does not hold an image ({type(exc).__name__}: "
                        f"{_first_line(exc)}); only images can be given inline. Fix: put the base64 of a whole image "
                        "file (PNG, JPEG ...) there, or save the media to a file and name the file.",
                        DataKind.BAD_IMAGE, Origin(media=shown)) from None


# --------------------------------------------------------------------------- reading


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def media_failure(exc: BaseException, ref: str, what: str, at: str = "") -> DataError:
    """The ``DataError`` for an exception raised while reading the bytes of ``ref`` (kind by exception type).

    fsspec reports a refused HTTP connection as ``FileNotFoundError`` with the
    ``ConnectionRefusedError`` underneath, so the whole chain is looked at.
    """
    origin = Origin(media=ref)
    chain = list(_chain(exc))
    if any(isinstance(e, DataError) for e in chain):
        return next(e for e in chain if isinstance(e, DataError))
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return DataError(f"{at}cannot read the {what} {ref}: connection refused (nothing listens at that host and "
                         "port). Fix: check the URL and that the server is up.", DataKind.MEDIA_UNREACHABLE, origin)
    if any(isinstance(e, TimeoutError) for e in chain):
        return DataError(f"{at}reading the {what} {ref} timed out. Fix: check the storage or the server.",
                         DataKind.MEDIA_TIMEOUT, origin)
    connection = next((e for e in chain if isinstance(e, ConnectionError) or (
        isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and is_url(ref))), None)
    if connection is not None:
        return DataError(f"{at}cannot connect to read the {what} {ref} ({type(connection).__name__}: "
                         f"{_first_line(connection)}). Fix: check the URL and the network.",
                         DataKind.MEDIA_UNREACHABLE, origin)
    if isinstance(exc, FileNotFoundError):
        if what != "image":  # the video readers' wording: the file first
            return DataError(f"{at}file {ref}: {what} not found; check the path or URL and the dataset's data_path",
                             DataKind.MISSING_MEDIA, origin)
        return DataError(f"{at}image not found: {ref}. Fix: check that the file exists; relative media paths are "
                         "resolved against the dataset's data_path in the dataset dictionary.",
                         DataKind.MISSING_MEDIA, origin)
    if isinstance(exc, IsADirectoryError):
        return DataError(f"{at}{ref} is a folder, not an {what} file. Fix: point the record (or --image) at "
                         f"an {what} file inside it.", DataKind.BAD_IMAGE, origin)
    if isinstance(exc, PermissionError):
        return DataError(f"{at}cannot read the {what} {ref}: permission denied. Fix: make it readable by the "
                         "user that runs training.", DataKind.MEDIA_UNREACHABLE, origin)
    if isinstance(exc, ImportError):
        return DataError(f"{at}cannot open {ref}: {exc}. Fix: install the fsspec backend for this URL scheme "
                         "(e.g. aiohttp for http, s3fs for s3, gcsfs for gs).", DataKind.CONFIG, origin)
    if is_url(ref):
        # Remote stores raise their own types (botocore's NoCredentialsError, gcsfs' HttpError ...):
        # whatever fails while fetching the user's URL is about that URL.
        return DataError(f"{at}cannot read the {what} {ref} ({type(exc).__name__}: {_first_line(exc)}). Fix: "
                         "check the URL and the credentials for its storage.", DataKind.MEDIA_UNREACHABLE, origin)
    return DataError(f"{at}cannot read the {what} {ref} ({type(exc).__name__}: {_first_line(exc)}). Fix: check "
                     "the file and its storage.", DataKind.MEDIA_UNREACHABLE, origin)


_OBJECT_REPR = re.compile(r" ?<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    text = text[0] if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_local(path: str, what: str, at: str) -> None:
    """Refuse what is not a regular file before opening it: opening a FIFO blocks until a writer comes."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise media_failure(exc, path, what, at) from None
    if stat.S_ISDIR(mode):
        raise media_failure(IsADirectoryError(path), path, what, at)
    if not stat.S_ISREG(mode):
        raise DataError(f"{at}{path} is not a regular file (a FIFO, socket or device), so reading it could block "
                        f"forever. Fix: point the record at the {what} file itself.",
                        DataKind.MEDIA_UNREACHABLE, Origin(media=path))


def read_url_bytes(url: str, what: str = "file", at: str = "") -> bytes:
    """The bytes at an fsspec URL (``s3://``, ``gs://``, ``https://`` ...); problems as ``DataError``."""
    try:
        import fsspec  # local: only URLs need it

        with fsspec.open(url, "rb") as f:
            return f.read()
    except Exception as exc:
        raise media_failure(exc, url, what, at) from None


def lives_here(ref: Any) -> bool:
    """True for fsspec ``memory://`` URLs: their files exist only in this process's memory, so they are
    read here, with no time limit (RAM does not stall), not in the reader process."""
    return isinstance(ref, str) and ref.startswith("memory://")


def _timed(fn: Callable[[], Any], ref: str, what: str, at: str, timeout_s: float | None):
    if lives_here(ref):
        timeout_s = None
    try:
        return run_with_timeout(fn, timeout_s, f"reading {ref}", preload=["fsspec"] if is_url(ref) else [])
    except ReaderDied as exc:  # the image crashed its decoder
        raise DataError(f"{at}reading the {what} {ref} crashed its reader ({exc}). Fix: the file may be corrupt; "
                        "re-encode it or drop the record.", DataKind.BAD_IMAGE, Origin(media=ref)) from None
    except TimeoutError:
        raise DataError(f"{at}reading the {what} {ref} took longer than the {timeout_s:g} s limit (a stalled "
                        "server or storage). Fix: check the storage, or raise --media_timeout.",
                        DataKind.MEDIA_TIMEOUT, Origin(media=ref)) from None


def _open_pil(ref: str, what: str, at: str) -> Image.Image:
    """Open (header only) a local path or URL as a PIL image, inside the caller's time limit."""
    if is_url(ref) and not ref.startswith("file://"):
        source: Any = io.BytesIO(read_url_bytes(ref, what, at))
    else:
        source = ref[len("file://"):] if ref.startswith("file://") else ref
        _check_local(source, what, at)
    try:
        return Image.open(source)
    except Exception as exc:  # noqa: BLE001  whatever PIL raises on these bytes is about the file
        raise _bad_image(exc, ref, at) from None


def _bad_image(exc: BaseException, ref: str, at: str) -> DataError:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return media_failure(exc, ref, "image", at)
    local = ref.removeprefix("file://")
    if not is_url(local) and os.path.isfile(local) and os.path.getsize(local) == 0:
        return DataError(f"{at}cannot read image {ref}: the file is empty (0 bytes). Fix: download or copy it "
                         "again, or drop the record.", DataKind.BAD_IMAGE, Origin(media=ref))
    # PIL names the stream it read ("<_io.BytesIO object at 0x7f...>"): an address that differs per run.
    detail = _OBJECT_REPR.sub("", _first_line(exc))
    return DataError(f"{at}cannot read image {ref}: {type(exc).__name__}: {detail}. Fix: the file may "
                     "be corrupt or not an image; re-encode it or drop the record.", DataKind.BAD_IMAGE,
                     Origin(media=ref))


def check_aspect_ratio(width: int, height: int, ref: str, at: str = "") -> None:
    """Refuse what the Qwen image processors refuse (with a ValueError deep in ``smart_resize``)."""
    if min(width, height) < 1 or max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise DataError(f"{at}image {ref} is {width}x{height}, more than {MAX_ASPECT_RATIO}:1, which the Qwen "
                        "image processor refuses. Fix: crop or pad it, or drop the record.", DataKind.BAD_IMAGE,
                        Origin(media=ref))


def _displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed: EXIF orientations 5-8 turn the image by a quarter."""
    width, height = image.size
    if image.format == "PNG" and "exif" not in image.info:
        # Pillow's PNG getexif() decodes every pixel to look for an eXIf chunk after the image
        # data; writers (Pillow, phones' exporters) put it before, where opening finds it.
        return width, height
    try:
        orientation = image.getexif().get(_ORIENTATION)
    except Exception:  # noqa: BLE001  an unreadable EXIF block: the image shows as stored
        orientation = None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def as_displayed(image: Image.Image) -> Image.Image:
    """``image`` in RGB as a viewer shows it: EXIF orientation applied, 16-bit and 32-bit grayscale scaled
    to 8 bits (``convert("RGB")`` alone clips them, turning a 16-bit photo almost all white), transparency
    composited onto white."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I" (32-bit): PNGs of 16-bit grayscale
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        # convert("RGB") drops the alpha and keeps whatever colour the transparent pixels store (often
        # black, or leftovers of an edit) -- pixels nobody sees. The Qwen processors composite them onto
        # white (transformers' convert_to_rgb, on this same condition), so training does the same.
        # qwen-vl-utils' to_rgb agrees for RGBA; for LA and palette transparency it keeps the stored colour.
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def open_image(ref: Any, origin: str | None = None, timeout_s: float | None = DEFAULT_MEDIA_TIMEOUT_S) -> Image.Image:
    """Open an image as RGB, as displayed, from a local path, an fsspec URL or a PIL image.

    Reading the bytes stops after ``timeout_s`` seconds (in the reader process, see
    ``time_limit``); they are decoded here.  A missing, unreachable
    or unreadable file raises DataError naming the file (and ``origin``, e.g. the
    dataset and record, when given) with the likely fix, its kind saying which.
    """
    at = f"{origin}: " if origin else ""
    if isinstance(ref, Image.Image):
        check_aspect_ratio(*_displayed_size(ref), "<in-memory image>", at)
        try:  # an image opened lazily from a record's bytes decodes here: truncated data fails here
            return as_displayed(ref)
        except Exception as exc:  # noqa: BLE001
            raise _bad_image(exc, "<in-memory image>", at) from None
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str):
        raise DataError(f"{at}cannot open {ref!r} as an image: expected a path, a URL or a PIL image.",
                        DataKind.BAD_IMAGE)

    # Only the bytes are read in the reader process (the read is what stalls, on a stalled mount or
    # server); they are decoded here: sending compressed bytes costs a fraction of sending pixels.
    data = _timed(functools.partial(_image_bytes, ref, at), ref, "image", at, timeout_s)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # noqa: BLE001  whatever PIL raises on these bytes (truncated, corrupt) is the file's
        raise _bad_image(exc, ref, at) from None
    check_aspect_ratio(*_displayed_size(image), ref, at)
    try:
        return as_displayed(image)
    except Exception as exc:  # noqa: BLE001  a mode PIL cannot convert
        raise _bad_image(exc, ref, at) from None


def _image_bytes(ref: str, at: str) -> bytes:
    """The bytes of an image file or URL (``open_image``'s read, done in the reader process)."""
    if is_url(ref) and not ref.startswith("file://"):
        return read_url_bytes(ref, "image", at)
    path = ref[len("file://"):] if ref.startswith("file://") else ref
    _check_local(path, "image", at)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise _bad_image(exc, ref, at) from None


def image_header(ref: Any, origin: str | None = None, verify: bool = False,
                 timeout_s: float | None = DEFAULT_MEDIA_TIMEOUT_S) -> tuple[int, int]:
    """(height, width) of an image as displayed, from its header; ``verify`` also decodes the pixels.

    The same checks and errors as ``open_image`` (the size the renderer will see, EXIF
    orientation included), without decoding pixels unless ``verify``.
    """
    at = f"{origin}: " if origin else ""
    if isinstance(ref, Image.Image):
        width, height = _displayed_size(ref)
        check_aspect_ratio(width, height, "<in-memory image>", at)
        if verify:
            try:
                ref.load()  # what training does (as_displayed); a no-op for an image decoded already
            except Exception as exc:  # noqa: BLE001
                raise _bad_image(exc, "<in-memory image>", at) from None
        return height, width
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str):
        raise DataError(f"{at}cannot open {ref!r} as an image: expected a path, a URL or a PIL image.",
                        DataKind.BAD_IMAGE)

    width, height = _timed(functools.partial(_read_size, ref, at, verify), ref, "image", at, timeout_s)
    check_aspect_ratio(width, height, ref, at)
    return height, width


def _read_size(ref: str, at: str, verify: bool) -> tuple[int, int]:
    """``image_header``'s read, in the reader process: (width, height) as displayed."""
    with _open_pil(ref, "image", at) as image:
        try:
            if verify:
                image.load()  # what training does; Image.verify() misses truncated data
            return _displayed_size(image)
        except Exception as exc:  # noqa: BLE001
            raise _bad_image(exc, ref, at) from None
