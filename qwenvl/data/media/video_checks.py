"""Videos that decode but are not what the record means: a still image named ``.mp4``, a clip too short.

* ``still_image_format(path)``: FFmpeg-based decoders read a PNG or JPEG as a video of
  one frame, so a mislabelled image would train as a one-frame "video" without a word.
  PIL identifies still images from their header (a few bytes), so this costs one open.
  Animated GIF/WebP/APNG (more than one frame) are left to the video decoders.
* ``few_frames_warning(total_frames, fps, settings)``: a clip with fewer frames than
  ``--video_min_frames`` is sampled with fewer (training accepts it; the audit reports it
  and training logs it once per file).
"""
from __future__ import annotations

import logging

from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

__all__ = ["still_image_format", "few_frames_warning", "warn_few_frames"]

_warned: set[str] = set()


def still_image_format(path: str) -> str | None:
    """The image format (``"PNG"``, ``"JPEG"`` ...) when ``path`` holds a single still image, else None."""
    try:
        with Image.open(path) as image:
            frames = getattr(image, "n_frames", 1)
            return image.format if frames <= 1 else None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None  # not an image PIL knows: leave it to the video decoders


def few_frames_warning(total_frames: int, fps: float, settings) -> str | None:
    """A sentence when a video has fewer frames than ``settings.min_frames`` asks for, else None."""
    if total_frames >= settings.min_frames:
        return None
    from qwenvl.data.media.video import frame_count  # local: video imports this module (a cycle)

    seconds = total_frames / fps if fps and fps > 0 else float("nan")
    return (f"the video has {total_frames} frame(s) ({seconds:.2f} s), fewer than --video_min_frames "
            f"{settings.min_frames}; it is sampled at {frame_count(total_frames, fps, settings)} frame(s). "
            "Fix: use a longer clip, or lower --video_min_frames if this is intended")


def warn_few_frames(name: str, total_frames: int, fps: float, settings) -> None:
    """Log ``few_frames_warning`` once per file in this process (training)."""
    message = few_frames_warning(total_frames, fps, settings)
    if message and name not in _warned:
        _warned.add(name)
        logger.warning("%s: %s", name, message)
