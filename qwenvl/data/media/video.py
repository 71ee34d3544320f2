"""Sample, time and size the frames of one video, and hand them to the Qwen processors.

``load_video(source, settings) -> VideoClip`` is the whole public path:

* **Which frames.**  ``n = duration * fps`` clamped to ``[min_frames, max_frames]`` (the
  bounds first rounded inwards to multiples of ``temporal_patch_size``) and to the
  frames in the file, then rounded down to a multiple of ``temporal_patch_size``: the
  rule of qwen-vl-utils' ``smart_nframes``.  ``duration = total_frames / source_fps``.
  The indices are ``round(i * (total_frames - 1) / (n - 1))``, evenly spaced from the
  first frame to the last, computed exactly, so a file and settings always give the
  same frames.  A file shorter than one temporal patch repeats its frames (the
  processors would pad with the last frame the same way).
* **When.**  The time scale is the serving stack's, so a model is trained on the
  times it will be served with: ``sampled_fps = n / total_frames * source_fps`` (the
  number qwen-vl-utils' ``fetch_video`` returns as ``sample_fps`` and transformers'
  ``VideoMetadata.sampled_fps`` computes, which vLLM and the Qwen processors read), so
  Qwen2.5-VL's ``second_per_grid_ts = temporal_patch_size / sampled_fps``.  Qwen3-VL
  writes ``<t seconds>`` per temporal patch, the mean of ``index / source_fps`` of the
  patch's first and last frame (transformers' ``Qwen3VLProcessor._calculate_timestamps``);
  ``VideoClip.grid_timestamps`` gives the same numbers.  Both come out of the
  processor from the ``VideoMetadata`` of ``processor_video_inputs``.
  This is not the true spacing of the sampled frames: with the first and last frame
  both sampled they are ``(total_frames - 1) / (n - 1)`` frames apart, so on a 1 s,
  24 fps clip sampled at 4 frames ``second_per_grid_ts`` is 0.5 where the frames are
  0.64 s apart per grid step (a gap that shrinks as ``n`` grows).  The released models
  were trained, and are served, on the former; training on the latter (what this module
  did before) skewed the mRoPE time axis by up to 28% against serving.
  ``timestamps`` keep each sampled frame's presentation time as the decoder reports it,
  in seconds since the video's first frame, for inspection.
* **How big.**  Each frame is resized (bicubic, antialiased) so height and width are
  multiples of ``patch_size * merge_size`` and ``min_pixels <= h * w <= max_pixels``,
  keeping the aspect ratio (qwen-vl-utils' ``smart_resize``).  With ``total_pixels``
  the per-frame cap is also ``total_pixels * temporal_patch_size / n`` (the budget
  counts one frame per temporal patch, as qwen-vl-utils' ``VIDEO_TOTAL_PIXELS``),
  never below ``1.05 * min_pixels``.
* **Frame images.**  A list of image paths, or a folder of images (sorted by name with
  digit runs compared as numbers), is a video at ``frame_list_fps`` (default 2.0, the
  rate qwen-vl-utils assumes for frame lists), sampled by the same rule.

``processor_video_inputs(clip)`` gives the frames and the ``VideoMetadata`` to pass to a
Qwen processor, ``processor_videos_kwargs(metadata)`` the ``videos_kwargs`` of that call::

    videos, metadata = zip(*(processor_video_inputs(clip) for clip in clips))
    processor(text=[text], images=images or None, videos=list(videos),
              videos_kwargs=processor_videos_kwargs(metadata), return_tensors="pt")
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import torch
from transformers.video_utils import VideoMetadata

from qwenvl.data.errors import DataError, DataKind, Origin, where
from qwenvl.data.media.read import MAX_ASPECT_RATIO, is_url, lives_here
from qwenvl.data.media.time_limit import DEFAULT_MEDIA_TIMEOUT_S, ReaderDied
from qwenvl.data.media.video_checks import warn_few_frames
from qwenvl.data.media.video_decode import (DecodedVideo, backend_names, decode_video, fetched, list_frame_folder,
                                            local_path, read_image_frames, run_with_timeout)

VIDEO_MIN_TOKENS_PER_FRAME = 128  # qwen-vl-utils' VIDEO_MIN_TOKEN_NUM
VIDEO_MAX_TOKENS_PER_FRAME = 768  # qwen-vl-utils' VIDEO_MAX_TOKEN_NUM

PROCESSOR_VIDEO_KWARGS = {"do_sample_frames": False, "do_resize": False, "cap_pixels_per_frame": False}
"""Video-processor options for clips from ``load_video``: the frames are already chosen
and sized, so the video processor must neither sample them (Qwen3-VL's default is to
sample) nor resize them.  ``cap_pixels_per_frame`` only changes resizing; setting it
silences transformers' warning about it.  Pass these as ``videos_kwargs`` (see
``processor_videos_kwargs``), never as flat keywords: a flat ``do_resize=False`` also
reaches the image processor and breaks images in the same call."""


@dataclass(frozen=True)
class VideoSettings:
    """How videos are sampled, sized and decoded; mirrors ``--video_fps``, ``--video_min_frames``,
    ``--video_max_frames``, ``--video_min_pixels``, ``--video_max_pixels``.

    ``min_pixels``/``max_pixels`` bound each frame; ``None`` means 128 and 768 tokens'
    worth, ``N * (patch_size * merge_size) ** 2`` (qwen-vl-utils' defaults).
    ``total_pixels`` (optional) caps the whole video, see the module docstring.
    ``patch_size`` is 14 for Qwen2-VL and Qwen2.5-VL, 16 for Qwen3-VL; take the three
    patch sizes from the model's processor with ``VideoSettings.for_processor``.
    ``backend`` is ``auto``, ``torchcodec``, ``decord``, ``pyav`` or a registered name;
    ``timeout_s`` bounds the decoding of one video (``None``: no limit);
    ``num_threads`` is the decoder's thread count (0: the decoder chooses; use 1 in
    many DataLoader workers).
    """

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int | None = None
    max_pixels: int | None = None
    total_pixels: int | None = None
    temporal_patch_size: int = 2
    patch_size: int = 14
    merge_size: int = 2
    backend: str = "auto"
    timeout_s: float | None = DEFAULT_MEDIA_TIMEOUT_S
    frame_list_fps: float = 2.0
    num_threads: int = 0

    def __post_init__(self):
        problems = []
        for name in ("fps", "frame_list_fps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a positive number, got {value!r}")
        for name in ("temporal_patch_size", "patch_size", "merge_size", "min_frames", "max_frames"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.min_frames > self.max_frames:
            problems.append(f"min_frames {self.min_frames} is above max_frames {self.max_frames}: swap them")
        elif self.max_frames < self.temporal_patch_size:
            problems.append(f"max_frames {self.max_frames} is below one temporal patch "
                            f"({self.temporal_patch_size} frames): raise it")
        for name in ("min_pixels", "max_pixels", "total_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be positive or None, got {value!r}")
        if self.frame_min_pixels > self.frame_max_pixels:
            problems.append(f"min_pixels {self.frame_min_pixels} is above max_pixels {self.frame_max_pixels}: "
                            "swap them")
        if self.backend != "auto" and self.backend not in backend_names():
            problems.append(f"backend must be auto or one of {', '.join(backend_names())}, not {self.backend!r}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            problems.append(f"timeout_s must be positive or None, got {self.timeout_s!r}")
        if self.num_threads < 0:
            problems.append(f"num_threads must be 0 (decoder chooses) or more, got {self.num_threads}")
        if problems:
            raise ValueError("invalid video settings:\n  " + "\n  ".join(problems))

    @property
    def factor(self) -> int:
        """Height and width are multiples of this: one merged patch, ``patch_size * merge_size``."""
        return self.patch_size * self.merge_size

    @property
    def frame_min_pixels(self) -> int:
        """The per-frame pixel floor, with the ``None`` default resolved."""
        return self.min_pixels if self.min_pixels is not None else VIDEO_MIN_TOKENS_PER_FRAME * self.factor ** 2

    @property
    def frame_max_pixels(self) -> int:
        """The per-frame pixel cap before ``total_pixels``, with the ``None`` default resolved."""
        return self.max_pixels if self.max_pixels is not None else VIDEO_MAX_TOKENS_PER_FRAME * self.factor ** 2

    @classmethod
    def for_processor(cls, processor, **settings) -> "VideoSettings":
        """Settings whose patch, merge and temporal patch sizes are those of ``processor``
        (a Qwen processor or its ``video_processor``); ``settings`` sets the rest.

        The processor's own pixel bounds are not read: Qwen3-VL's video processor
        bounds the whole video (frames x height x width), not one frame.
        """
        video = getattr(processor, "video_processor", processor)
        sizes = {name: int(getattr(video, name)) for name in ("patch_size", "merge_size", "temporal_patch_size")}
        return cls(**{**sizes, **settings})


def video_settings_from(data_args, processor) -> VideoSettings:
    """The video settings of the flags (``DataArguments``), with ``processor``'s patch sizes.

    The one place flags become ``VideoSettings``: training, the length cache, the audit,
    ``pack_data``, ``chat`` and the benchmarks all call it, so they sample frames alike.
    """
    return VideoSettings.for_processor(
        processor, fps=data_args.video_fps, min_frames=data_args.video_min_frames,
        max_frames=data_args.video_max_frames, min_pixels=data_args.video_min_pixels,
        max_pixels=data_args.video_max_pixels, backend=data_args.video_backend,
        timeout_s=getattr(data_args, "media_timeout", None) or DEFAULT_MEDIA_TIMEOUT_S)


def _round_down(value: float, multiple: int) -> int:
    return int(math.floor(value / multiple)) * multiple


def _round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple)) * multiple


def frame_count(total_frames: int, source_fps: float, settings: VideoSettings) -> int:
    """How many frames to sample from a video of ``total_frames`` at ``source_fps`` (module docstring)."""
    if total_frames < 1:
        raise ValueError("the video has no frames")
    if not (math.isfinite(source_fps) and source_fps > 0):
        raise ValueError(f"the video's frame rate is unknown ({source_fps!r})")
    step = settings.temporal_patch_size
    wanted = total_frames / source_fps * settings.fps
    low, high = _round_up(settings.min_frames, step), _round_down(settings.max_frames, step)
    n = _round_down(min(max(wanted, low), high, total_frames), step)
    # Shorter than one temporal patch: repeat frames rather than refuse the video.
    return max(n, step)


def sample_frame_indices(total_frames: int, source_fps: float, settings: VideoSettings) -> list[int]:
    """The frame indices to sample: ``frame_count`` of them, evenly spaced from first to last frame."""
    n = frame_count(total_frames, source_fps, settings)
    last = total_frames - 1
    # Exact rationals, so rounding (half to even) never depends on float error.
    return [round(Fraction(i * last, n - 1)) for i in range(n)]


def serving_fps(num_sampled: int, total_frames: int, source_fps: float) -> float:
    """The sampled frame rate as the serving stack computes it: ``num_sampled / total_frames * source_fps``.

    qwen-vl-utils (``sample_fps`` of ``fetch_video``) and transformers
    (``VideoMetadata.sampled_fps``) both use this, and Qwen2.5-VL's processor turns it into
    ``second_per_grid_ts``; see the module docstring for how it differs from the frames' spacing.
    """
    return num_sampled / total_frames * source_fps


def frame_size(height: int, width: int, num_frames: int, settings: VideoSettings) -> tuple[int, int]:
    """The (height, width) each of ``num_frames`` frames is resized to (module docstring)."""
    factor, min_pixels = settings.factor, settings.frame_min_pixels
    max_pixels = settings.frame_max_pixels
    if settings.total_pixels is not None:
        share = settings.total_pixels * settings.temporal_patch_size / num_frames
        max_pixels = max(min(max_pixels, share), int(min_pixels * 1.05))
    if min(height, width) < 1:
        raise ValueError(f"frame size {width}x{height} is empty")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"frame size {width}x{height} is more than {MAX_ASPECT_RATIO}:1; crop or pad the video")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, _round_down(height / scale, factor))
        w = max(factor, _round_down(width / scale, factor))
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h, w = _round_up(height * scale, factor), _round_up(width * scale, factor)
    return h, w


@dataclass
class VideoClip:
    """Sampled, resized frames of one video and the timing the model needs."""

    frames: torch.Tensor  # (T, C, H, W) uint8 RGB, T a multiple of temporal_patch_size
    timestamps: list[float]  # seconds since the video's first frame, per sampled frame
    frame_indices: list[int]  # index in the source video of each sampled frame
    source_fps: float  # the source's average frame rate (frame_list_fps for frame images)
    total_frames: int  # frames in the source
    duration: float  # total_frames / source_fps, seconds
    sampled_fps: float  # serving_fps(len(frame_indices), total_frames, source_fps)
    backend: str  # decoder that produced the frames ("images" for frame images)
    source: str  # the file or folder, or the first frame image

    def second_per_grid_t(self, temporal_patch_size: int = 2) -> float:
        """Seconds between consecutive temporal grid steps: Qwen2.5-VL's ``second_per_grid_ts``."""
        return temporal_patch_size / self.sampled_fps

    def grid_timestamps(self, temporal_patch_size: int = 2) -> list[float]:
        """The ``<t seconds>`` Qwen3-VL writes before each temporal patch, unrounded.

        As transformers' ``Qwen3VLProcessor._calculate_timestamps``: frame times are
        ``index / source_fps``, the index list is padded with its last index to a whole
        patch, and each patch gets the mean of its first and last frame's time.
        """
        indices = list(self.frame_indices)
        indices += [indices[-1]] * (-len(indices) % temporal_patch_size)
        times = [i / self.source_fps for i in indices]
        return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def load_video(source: str | os.PathLike | Sequence[str | os.PathLike],
               settings: VideoSettings | None = None, origin: str | None = None) -> VideoClip:
    """Decode, sample and resize one video: a file, a folder of frame images, or a list of them.

    Files and frames may be local paths, ``file://`` or other fsspec URLs (a remote
    video is downloaded to a temporary file first; ``timeout_s`` bounds the download
    and the decoding each).  Every problem with the data (missing, empty, corrupt, cut
    short, no frames, time-out, a missing or odd-sized frame image) raises
    ``DataError`` naming the file, after ``origin`` (e.g. the dataset and record) when given.
    """
    try:
        return _load(source, settings or VideoSettings())
    except DataError as exc:
        if origin and origin not in str(exc):
            exc.args = (f"{origin}: {exc}",)  # the same error (its kind and origin kept), located
        raise


def _load(source, settings: VideoSettings) -> VideoClip:
    # A partial, not a closure: under a time limit the decode (and so the plan) runs in the reader process.
    plan = functools.partial(sample_frame_indices, settings=settings)

    if isinstance(source, (str, os.PathLike)):
        name = local_path(os.fspath(source))
        if is_url(name):
            with fetched(name, settings.timeout_s) as path:
                decoded, backend = decode_video(path, plan, settings.backend, settings.timeout_s,
                                                settings.num_threads, label=name)
            return _finish(decoded, backend, name, settings)
        if not os.path.isdir(name):
            decoded, backend = decode_video(name, plan, settings.backend, settings.timeout_s, settings.num_threads)
            return _finish(decoded, backend, name, settings)
        paths = list_frame_folder(name)
    else:
        paths = [os.fspath(p) for p in source]
        if not paths:
            raise DataError("a video given as a list of frame images has no frames; list at least one image",
                            DataKind.BAD_VIDEO)
        name = f"{paths[0]} (+{len(paths) - 1} frames)"
    try:
        here = any(lives_here(p) for p in paths)  # memory:// frames exist only in this process
        decoded = run_with_timeout(functools.partial(read_image_frames, paths, settings.frame_list_fps, plan, name),
                                   None if here else settings.timeout_s, f"frames of {name}")
    except ReaderDied as exc:  # a frame image crashed its decoder
        raise DataError(f"{where(file=name)}: reading the frame images crashed the reader ({exc}); a frame may be "
                        "corrupt: re-encode or remove it", DataKind.BAD_VIDEO, Origin(media=name)) from None
    except TimeoutError:
        raise DataError(f"{where(file=name)}: reading the frame images took longer than the "
                        f"{settings.timeout_s:g} s limit; check the storage or raise --media_timeout",
                        DataKind.MEDIA_TIMEOUT, Origin(media=name)) from None
    return _finish(decoded, "images", name, settings)


def _fit(frames: torch.Tensor, settings: VideoSettings, name: str) -> torch.Tensor:
    n, _, height, width = frames.shape
    try:
        h, w = frame_size(height, width, n, settings)
    except ValueError as exc:
        raise DataError(f"{where(file=name)}: {exc}", DataKind.BAD_VIDEO, Origin(media=name)) from None
    if (h, w) == (height, width):
        return frames
    from torchvision.transforms import InterpolationMode  # local: torchvision loads its ops; only resizing needs it
    from torchvision.transforms.v2 import functional as tvF

    return tvF.resize(frames, [h, w], interpolation=InterpolationMode.BICUBIC, antialias=True)


def resize_clip(clip: VideoClip, settings: VideoSettings) -> VideoClip:
    """``clip`` with its frames refitted to the pixel bounds of ``settings``; timing unchanged.

    For shrinking a sample that does not fit the context, e.g. with
    ``dataclasses.replace(settings, max_pixels=smaller)``: resizing here keeps the
    per-frame meaning of the bounds in every family (Qwen3-VL's video processor would
    read them as a bound on the whole video).
    """
    return dataclasses.replace(clip, frames=_fit(clip.frames, settings, clip.source).contiguous())


def _finish(decoded: DecodedVideo, backend: str, name: str, settings: VideoSettings) -> VideoClip:
    warn_few_frames(name, decoded.total_frames, decoded.source_fps, settings)
    frames = _fit(decoded.frames, settings, name)
    start = decoded.pts[0]  # the first sampled frame is always the video's first frame
    return VideoClip(
        frames=frames.contiguous(),
        timestamps=[t - start for t in decoded.pts],
        frame_indices=list(decoded.indices),
        source_fps=decoded.source_fps,
        total_frames=decoded.total_frames,
        duration=decoded.total_frames / decoded.source_fps,
        sampled_fps=serving_fps(len(decoded.indices), decoded.total_frames, decoded.source_fps),
        backend=backend,
        source=name,
    )


def processor_video_inputs(clip: VideoClip) -> tuple[torch.Tensor, VideoMetadata]:
    """The ``(video, video_metadata)`` pair to pass a Qwen processor for ``clip``.

    The metadata is what qwen-vl-utils hands the processor (the file's frame rate and
    frame count, the sampled indices), so with
    ``videos_kwargs=processor_videos_kwargs([metadata])`` Qwen2.5-VL's
    ``second_per_grid_ts`` is ``temporal_patch_size / clip.sampled_fps`` and Qwen3-VL's
    ``<t seconds>`` are ``clip.grid_timestamps()`` (to the one decimal it prints), as at
    serving time; Qwen2-VL reads no timing.
    """
    _, _, height, width = clip.frames.shape
    metadata = VideoMetadata(
        total_num_frames=clip.total_frames,
        fps=clip.source_fps,
        width=width,
        height=height,
        duration=clip.duration,
        video_backend=clip.backend,
        # A copy: Qwen3-VL's processor pads this list in place when its length is odd.
        frames_indices=list(clip.frame_indices),
    )
    return clip.frames, metadata


def processor_videos_kwargs(metadata: Sequence[VideoMetadata]) -> dict:
    """The ``videos_kwargs`` of a processor call whose videos come from ``processor_video_inputs``,
    ``metadata`` listing one entry per video in the order of ``videos``."""
    return {**PROCESSOR_VIDEO_KWARGS, "video_metadata": list(metadata)}


__all__ = [
    "PROCESSOR_VIDEO_KWARGS", "VideoClip", "VideoSettings", "serving_fps",
    "frame_count", "frame_size", "load_video", "processor_video_inputs", "processor_videos_kwargs",
    "resize_clip", "sample_frame_indices",
]
