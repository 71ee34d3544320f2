"""Media references: resolving them against a dataset's data_path and opening images.

A media reference ("ref") is what a record names: a path relative to the
dataset's ``data_path``, an absolute path, an fsspec URL (``s3://``, ``gs://``,
``http(s)://``, ``file://`` ...), or, for HF datasets, an already decoded
``PIL.Image``. Media files are only ever read.
"""
from __future__ import annotations

import io
import os
import re
from typing import Any

from PIL import Image

from .errors import DataError

__all__ = ["is_url", "resolve_media", "open_image"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(ref: Any) -> bool:
    """True for ``scheme://...`` strings (fsspec URLs, including ``file://``)."""
    return isinstance(ref, str) and bool(_URL.match(ref))


def resolve_media(ref: Any, data_path: str | None, origin: str = "") -> Any:
    """Resolve one media reference against ``data_path``.

    Relative paths are joined to ``data_path`` (with ``/`` when it is a URL);
    absolute paths, URLs and PIL images are returned unchanged; a list (the frames
    of one video) is resolved item by item. An HF ``Image`` value that was not
    decoded (``{"bytes": ..., "path": ...}``) becomes a PIL image or a path.
    """
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, (list, tuple)):
        return [resolve_media(r, data_path, origin) for r in ref]
    if isinstance(ref, dict) and ("bytes" in ref or "path" in ref):
        if ref.get("bytes"):
            return Image.open(io.BytesIO(ref["bytes"]))
        ref = ref.get("path")
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str) or not ref:
        raise DataError(f"{origin}: a media reference must be a non-empty path or URL string, "
                        f"got {ref!r}. Fix: give the file name relative to data_path.")
    if is_url(ref) or os.path.isabs(ref) or not data_path:
        return ref
    if is_url(data_path):
        return data_path.rstrip("/") + "/" + ref
    return os.path.join(data_path, ref)


def open_image(ref: Any, origin: str | None = None) -> Image.Image:
    """Open an image as RGB from a local path, an fsspec URL or a PIL image.

    A missing or unreadable file raises DataError naming the file (and ``origin``,
    e.g. the dataset and record, when given) with the likely fix.
    """
    at = f"{origin}: " if origin else ""
    if isinstance(ref, Image.Image):
        return ref if ref.mode == "RGB" else ref.convert("RGB")
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str):
        raise DataError(f"{at}cannot open {ref!r} as an image: expected a path, a URL or a PIL "
                        "image.")
    try:
        if is_url(ref):
            import fsspec
            with fsspec.open(ref, "rb") as f:
                data = f.read()
            image = Image.open(io.BytesIO(data))
        else:
            image = Image.open(ref)
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except IsADirectoryError:
        raise DataError(f"{at}{ref} is a folder, not an image file. Fix: point the record (or --image) at "
                        "an image file inside it.") from None
    except FileNotFoundError:
        raise DataError(f"{at}image not found: {ref}. Fix: check that the file exists; relative "
                        "image paths are resolved against the dataset's data_path in the "
                        "dataset dictionary.") from None
    except ImportError as e:
        raise DataError(f"{at}cannot open {ref}: {e}. Fix: install the fsspec backend for this "
                        "URL scheme (e.g. aiohttp for http, s3fs for s3, gcsfs for gs).") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{at}cannot read image {ref}: {e}. Fix: the file may be corrupt or not "
                        "an image; re-encode it or drop the record.") from None
