"""Video decoding backends, the registry that names them, and the time limit around them.

A backend is a callable ``(path, plan, num_threads) -> DecodedVideo``.  It opens the
file, reads how many frames it has and its average frame rate, asks ``plan`` which
frame indices to return, and decodes only those.  Asking the plan from inside the
backend lets each backend open the file once.  Under a time limit the backend runs in
the reader process (``time_limit``): the backend and the plan must pickle (module-level
functions, or ``functools.partial`` of them), and the process is killed when the limit passes.

Built-in backends: ``torchcodec``, ``decord``, ``pyav``; ``auto`` tries them in that
order and falls back to the next when one fails on a file.  More can be added with
``register_backend`` (the tests register a deliberately slow one to check the limit).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import io
import logging
import os
import pickle
import re
import stat
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from qwenvl.data.errors import DataError, DataKind, Origin, where
from qwenvl.data.media.read import as_displayed, is_url, lives_here, read_url_bytes
from qwenvl.data.media.time_limit import ReaderDied, run_with_timeout  # noqa: F401  (run_with_timeout: video.py and tests import it here)
from qwenvl.data.media.video_checks import still_image_format

logger = logging.getLogger(__name__)

FramePlan = Callable[[int, float], Sequence[int]]
"""``(total_frames, source_fps) -> frame indices to decode`` (0-based, ascending, may repeat)."""


@dataclass
class DecodedVideo:
    """What a backend returns: the chosen frames at native resolution and their times."""

    frames: torch.Tensor  # (T, C, H, W) uint8 RGB
    pts: list[float]  # presentation time of each frame in seconds, as the container states it
    indices: list[int]  # frame index of each returned frame
    total_frames: int  # frames in the file (decodable, as counted by the backend)
    source_fps: float  # the stream's average frame rate


Backend = Callable[[str, FramePlan, int], DecodedVideo]

AUTO_ORDER = ("torchcodec", "decord", "pyav")
# The module each built-in needs; a backend counts as installed when it imports.
_BUILTIN_MODULES = {"torchcodec": "torchcodec.decoders", "decord": "decord", "pyav": "av"}
_import_problems: dict[str, str | None] = {}
_warned: set[str] = set()


def _check_plan(indices: Sequence[int], total_frames: int) -> list[int]:
    indices = [int(i) for i in indices]
    if not indices or min(indices) < 0 or max(indices) >= total_frames:
        raise RuntimeError(f"frame plan {indices[:4]}... is outside the file's {total_frames} frames")
    return indices


def _decode_torchcodec(path: str, plan: FramePlan, num_threads: int) -> DecodedVideo:
    from torchcodec.decoders import VideoDecoder

    # "exact" scans the file once to build a frame index, so frame counts and
    # timestamps are right even where the container's header is not.
    decoder = VideoDecoder(path, seek_mode="exact", num_ffmpeg_threads=num_threads)
    meta = decoder.metadata
    total, fps = int(meta.num_frames or 0), float(meta.average_fps or 0.0)
    indices = _check_plan(plan(total, fps), total)
    batch = decoder.get_frames_at(indices)
    return DecodedVideo(batch.data, batch.pts_seconds.tolist(), indices, total, fps)


def _decode_decord(path: str, plan: FramePlan, num_threads: int) -> DecodedVideo:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
    total, fps = len(reader), float(reader.get_avg_fps())
    indices = _check_plan(plan(total, fps), total)
    frames = torch.from_numpy(reader.get_batch(indices).asnumpy()).permute(0, 3, 1, 2).contiguous()
    pts = [float(t) for t in np.asarray(reader.get_frame_timestamp(indices))[:, 0]]
    return DecodedVideo(frames, pts, indices, total, fps)


def _decode_pyav(path: str, plan: FramePlan, num_threads: int) -> DecodedVideo:
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise RuntimeError("the file has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        # Count packets instead of trusting the header's frame count: it is absent in
        # some containers and wrong in cut files.  Demuxing without decoding is cheap.
        total = sum(1 for packet in container.demux(stream) if packet.size)
    fps = float(rate) if rate else 0.0
    indices = _check_plan(plan(total, fps), total)
    last = max(indices)
    wanted: dict[int, list[int]] = {}
    for slot, index in enumerate(indices):
        wanted.setdefault(index, []).append(slot)
    frames: list[torch.Tensor | None] = [None] * len(indices)
    pts: list[float] = [0.0] * len(indices)
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.thread_count = num_threads
        # Frames come out in presentation order, so the k-th frame decoded is index k;
        # decoding stops after the last frame the plan asked for.
        for k, frame in enumerate(container.decode(stream)):
            if k in wanted:
                image = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
                for slot in wanted[k]:
                    frames[slot], pts[slot] = image, float(frame.time or 0.0)
            if k >= last:
                break
    if any(f is None for f in frames):
        got = sum(f is not None for f in frames)
        raise RuntimeError(f"decoding ended early: got {got} of the {len(indices)} frames planned")
    return DecodedVideo(torch.stack(frames), pts, indices, total, fps)


_BACKENDS: dict[str, Backend] = {
    "torchcodec": _decode_torchcodec,
    "decord": _decode_decord,
    "pyav": _decode_pyav,
}


def register_backend(name: str, backend: Backend, *, replace: bool = False) -> None:
    """Add a decoder under ``name`` so ``VideoSettings(backend=name)`` uses it.

    ``backend`` must be a module-level function (or a ``functools.partial`` of one): it is
    sent by reference to the reader process that runs decodes under the time limit.
    """
    if name == "auto":
        raise ValueError("'auto' is reserved: it means 'try the built-in backends in order'")
    if name in _BACKENDS and not replace:
        raise ValueError(f"video backend {name!r} is already registered; pass replace=True to override it")
    try:
        pickle.loads(pickle.dumps(backend))
    except Exception as exc:
        raise ValueError(f"video backend {name!r} must be a module-level function (or a functools.partial of "
                         f"one) so the reader process can import it; a lambda or a nested function is not "
                         f"({type(exc).__name__}: {exc})") from None
    _BACKENDS[name] = backend


def unregister_backend(name: str) -> None:
    """Remove a backend added with ``register_backend`` (built-ins cannot be removed)."""
    if name in _BUILTIN_MODULES:
        raise ValueError(f"{name!r} is a built-in video backend")
    _BACKENDS.pop(name, None)


def backend_names() -> list[str]:
    """Every registered backend name, installed or not."""
    return list(_BACKENDS)


def import_problem(name: str) -> str | None:
    """Why backend ``name`` cannot be used here (``None`` when it can); the import is tried once."""
    if name not in _BACKENDS:
        return f"unknown video backend {name!r}; choose auto or one of {', '.join(_BACKENDS)}"
    module = _BUILTIN_MODULES.get(name)
    if module is None:
        return None
    if name not in _import_problems:
        try:
            importlib.import_module(module)
            _import_problems[name] = None
        except Exception as exc:  # torchcodec raises RuntimeError when FFmpeg's libraries are missing
            _import_problems[name] = f"{type(exc).__name__}: {_first_line(exc)}"
    return _import_problems[name]


def installed_backends() -> list[str]:
    """The built-in backends that import here, in the order ``auto`` tries them."""
    return [name for name in AUTO_ORDER if import_problem(name) is None]


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    text = text[0] if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_file(path: str, shown: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"{where(file=shown)}: video not found; check the path and the dataset's data_path",
                        DataKind.MISSING_MEDIA, Origin(media=shown))
    if os.path.isdir(path):
        return  # a folder of frame images, handled by the caller
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise DataError(f"{where(file=shown)}: not a regular file (a FIFO, socket or device), so reading it could "
                        "block forever; point the record at the video file itself",
                        DataKind.MEDIA_UNREACHABLE, Origin(media=shown))
    if os.path.getsize(path) == 0:
        raise DataError(f"{where(file=shown)}: video file is empty (0 bytes); re-export or remove it",
                        DataKind.BAD_VIDEO, Origin(media=shown))
    still = still_image_format(path)
    if still:
        raise DataError(f"{where(file=shown)}: this is a still {still} image, not a video (a decoder would read it "
                        "as a one-frame video); list it under 'image' with an <image> tag, or replace the file",
                        DataKind.BAD_VIDEO, Origin(media=shown))


def decode_video(path: str, plan: FramePlan, backend: str = "auto", timeout_s: float | None = 120.0,
                 num_threads: int = 0, label: str | None = None) -> tuple[DecodedVideo, str]:
    """Decode the frames ``plan`` picks from the video file at ``path``; returns them and the backend used.

    ``backend="auto"`` tries the installed built-ins in ``AUTO_ORDER``; a backend that
    fails on the file is logged (a warning the first time per backend, debug after)
    and the next one is tried.  ``timeout_s`` bounds the whole call, fallbacks
    included: a file that stalls one FFmpeg-based decoder usually stalls the others,
    so a time-out raises at once instead of trying the next.  Every problem is a
    ``DataError`` naming the file (``label`` where given, e.g. the URL a temp file came from).
    """
    shown = label or path
    _check_file(path, shown)
    if backend == "auto":
        names = installed_backends()
        if not names:
            raise DataError(
                "no video backend is installed: pip install torchcodec (with FFmpeg), decord or av"
                f" ({'; '.join(f'{n}: {import_problem(n)}' for n in AUTO_ORDER)})", DataKind.CONFIG)
    else:
        problem = import_problem(backend)
        if problem is not None:
            raise DataError(f"video backend {backend!r} cannot be used: {problem}; "
                            "install it or set the video backend to auto", DataKind.CONFIG)
        names = [backend]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    failures = []
    for name in names:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            decoded = run_with_timeout(functools.partial(_BACKENDS[name], path, plan, num_threads), left,
                                       f"{name} on {shown}", preload=[_BUILTIN_MODULES.get(name, "torch")])
        except TimeoutError:
            raise DataError(
                f"{where(file=shown)}: decoding with {name} did not finish within the {timeout_s:g} s limit; "
                "check the file (ffprobe), re-encode it (ffmpeg -i IN -c:v libx264 OUT.mp4) "
                "or raise --media_timeout", DataKind.MEDIA_TIMEOUT, Origin(media=shown)) from None
        except DataError:
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {_first_line(exc)}"
            failures.append(f"{name}: {reason}")
            log = logger.warning if name not in _warned else logger.debug
            _warned.add(name)
            log("video backend %s failed on %s (%s)%s", name, shown, reason,
                "; trying the next backend" if name != names[-1] else "")
            continue
        _validate(decoded, shown, name)
        return decoded, name
    raise DataError(
        f"{where(file=shown)}: could not decode the video ({'; '.join(failures)}); the file may be corrupt, "
        "cut short or not a video: check it with ffprobe, or re-encode it (ffmpeg -i IN -c:v libx264 OUT.mp4)",
        DataKind.BAD_VIDEO, Origin(media=shown))


def _validate(decoded: DecodedVideo, path: str, name: str) -> None:
    frames = decoded.frames
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        raise DataError(f"{where(file=path)}: backend {name} returned frames of shape {tuple(frames.shape)} "
                        f"and dtype {frames.dtype}, expected (T, 3, H, W) uint8", DataKind.BAD_VIDEO)
    if not (len(frames) == len(decoded.indices) == len(decoded.pts)):
        raise DataError(f"{where(file=path)}: backend {name} returned {len(frames)} frames for "
                        f"{len(decoded.indices)} planned indices", DataKind.BAD_VIDEO)


def local_path(ref: str) -> str:
    """``ref`` without a ``file://`` scheme: local files are read in place, never copied."""
    return ref[len("file://"):] if ref.startswith("file://") else ref


def read_url(url: str, what: str = "video") -> bytes:
    """The bytes at an fsspec URL (``s3://``, ``gs://``, ``https://`` ...), problems as ``DataError``."""
    return read_url_bytes(url, what)


@contextlib.contextmanager
def fetched(url: str, timeout_s: float | None) -> Iterator[str]:
    """Download ``url`` into a temporary file (removed afterwards) and yield its path.

    Every backend can decode a local file, not every one a stream; a training
    sample's video is small next to the decode work, so one copy is cheap.
    """
    suffix = os.path.splitext(url.split("?")[0])[1][:8]
    handle = tempfile.NamedTemporaryFile(prefix="qwenvl-video-", suffix=suffix, delete=False)
    handle.close()
    try:
        try:  # the reader process writes the file: the bytes do not pass through a pipe
            run_with_timeout(functools.partial(_download, url, handle.name),
                             None if lives_here(url) else timeout_s, f"download of {url}", preload=["fsspec"])
        except TimeoutError:
            raise DataError(f"{where(file=url)}: downloading the video took longer than {timeout_s:g} s; check the "
                            "storage or raise --media_timeout", DataKind.MEDIA_TIMEOUT, Origin(media=url)) from None
        except ReaderDied as exc:
            raise DataError(f"{where(file=url)}: downloading the video crashed the reader ({exc}); check the URL "
                            "and its storage", DataKind.MEDIA_UNREACHABLE, Origin(media=url)) from None
        yield handle.name
    finally:
        os.unlink(handle.name)


def _download(url: str, path: str) -> None:
    data = read_url(url)
    with open(path, "wb") as f:
        f.write(data)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _natural_key(name: str):
    # "frame_2.jpg" before "frame_10.jpg": digit runs compare as numbers.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_frame_folder(folder: str) -> list[str]:
    """The image files in ``folder`` in frame order: sorted by name, digit runs as numbers."""
    names = [n for n in os.listdir(folder)
             if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")]
    if not names:
        raise DataError(f"{where(file=folder)}: folder of video frames has no images "
                        f"({', '.join(IMAGE_SUFFIXES)}); put the frames there or point at a video file",
                        DataKind.BAD_VIDEO, Origin(media=folder))
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def read_image_frames(paths: Sequence[str], fps: float, plan: FramePlan, owner: str) -> DecodedVideo:
    """Load the frames ``plan`` picks from a list of image files that form a video at ``fps``.

    Every listed local file must exist (checked before any is read; URLs are checked
    when read); only the chosen ones are opened.  ``owner`` names the video (the folder, or the record) in messages.
    """
    from PIL import Image

    paths = [local_path(p) for p in paths]
    for index, path in enumerate(paths):
        # URLs are checked when read: asking remote storage about every frame costs a round trip each.
        if not is_url(path) and not os.path.isfile(path):
            raise DataError(f"{where(file=path)}: frame {index} of video {owner} not found; "
                            "check the frame list or folder", DataKind.MISSING_MEDIA, Origin(media=path))
    indices = _check_plan(plan(len(paths), fps), len(paths))
    loaded: dict[int, torch.Tensor] = {}
    size = None
    for index in dict.fromkeys(indices):
        path = paths[index]
        source = io.BytesIO(read_url(path, f"frame {index} of video {owner}")) if is_url(path) else path
        try:
            with Image.open(source) as image:
                array = np.array(as_displayed(image))  # a writable copy for torch, EXIF and 16-bit handled
        except Exception as exc:
            raise DataError(f"{where(file=paths[index])}: frame {index} of video {owner} is not a readable "
                            f"image ({_first_line(exc)}); replace or remove it", DataKind.BAD_VIDEO,
                            Origin(media=paths[index])) from None
        if size is None:
            size = array.shape
        elif array.shape != size:
            raise DataError(f"{where(file=paths[index])}: frame {index} of video {owner} is "
                            f"{array.shape[1]}x{array.shape[0]}, the first frame read is {size[1]}x{size[0]}; "
                            "all frames of a video must have one size", DataKind.BAD_VIDEO, Origin(media=paths[index]))
        loaded[index] = torch.from_numpy(array).permute(2, 0, 1)
    frames = torch.stack([loaded[i] for i in indices])
    return DecodedVideo(frames, [i / fps for i in indices], indices, len(paths), float(fps))
