"""The time limit around every media read (images, videos, frame images, URLs).

A stalled NFS mount, a FIFO, or a server that accepts a connection and never answers
would otherwise hang the preview, the audit and every training rank.  Python cannot
interrupt a blocked read, so the read runs in a daemon thread that is abandoned when
the limit passes; the caller gets ``TimeoutError`` (turned into a ``DataError`` of kind
``media_timeout`` by the media readers).  ``--media_timeout`` sets the limit.
"""
from __future__ import annotations

import threading
from typing import Callable

DEFAULT_MEDIA_TIMEOUT_S = 120.0  # seconds; what --media_timeout defaults to (videos always stopped at 120 s)

__all__ = ["DEFAULT_MEDIA_TIMEOUT_S", "run_with_timeout"]


def run_with_timeout(fn: Callable[[], object], timeout_s: float | None, what: str):
    """Run ``fn()`` in a daemon thread and wait at most ``timeout_s`` seconds for it.

    On time-out the thread is abandoned (Python cannot kill it; being a daemon it
    does not keep the process alive) and ``TimeoutError`` is raised.  An exception
    raised by ``fn`` is re-raised here.  ``timeout_s=None`` runs ``fn`` inline.
    A decoder that holds the GIL without releasing it would still block the caller;
    the FFmpeg-based decoders and file reads release it.
    """
    if timeout_s is None:
        return fn()
    box: dict[str, object] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"qwenvl-read {what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{what} took longer than {timeout_s:g} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]
