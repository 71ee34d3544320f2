"""Exact token counts of samples without decoding pixels: the renderer's second way of measuring.

``count_tokens(conversation, processor)`` gives what ``SampleRenderer.render`` would
produce (``input_ids`` length, visual tokens, vision-tower patches) from the media
*sizes* alone:

* images: the size in the file header (``PIL.Image.open(...).size``, no ``load()``),
  or a PIL image's ``.size``; the grid follows from the image processor's own
  ``get_number_of_image_patches`` (its resize rule and pixel bounds);
* videos: frame count, frame rate and frame size from the decoder used for training,
  which decodes one frame; the frames sampled and their size come from
  ``qwenvl.data.media.video`` (the rules ``load_video`` applies); the processor does not
  resize them again, so the grid is the frame size over the patch size;
* text: the renderer's own ``ChatRender`` (the same chat pieces, the same piece-aware
  tokenization), with each placeholder replaced by the processor's own
  ``replace_image_token`` / ``replace_video_token`` (Qwen3-VL writes a
  ``<t seconds>`` label per video frame there) fed with the counted grids; so the
  count is the renderer's, labels and literal special-token text included.

With ``model_max_length`` the count goes through the renderer's own fit-to-context rule
(``qwenvl.data.render.fit``) with counted sizes in place of pixels, so an over-long
sample gets the length it will be rendered at, or raises ``SampleTooLong`` exactly
when rendering would.  The cache of these counts is ``qwenvl.data.batch.length_cache``.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers.video_utils import VideoMetadata

from qwenvl.data.catalog.conversation_checks import conversation_of
from qwenvl.data.catalog.formats import Conversation
from qwenvl.data.catalog.registry import DatasetSpec
from qwenvl.data.errors import DataError, DataKind, bad_sample, where
from qwenvl.data.media.read import DEFAULT_MEDIA_TIMEOUT_S, image_header, is_url
from qwenvl.data.media.video import frame_size, sample_frame_indices
from qwenvl.data.media.video_decode import decode_video, fetched, list_frame_folder, local_path
from qwenvl.data.render.fit import Measured, fit_to_context
from qwenvl.data.render.prompt import template_messages
from qwenvl.data.render.sample import ChatRender, SampleRenderer, SpecialTokens

__all__ = ["SampleLength", "MediaError", "TokenCounter", "count_tokens", "image_size", "VideoProbe", "probe_video",
           "measure_record"]


# --------------------------------------------------------------------------- results

@dataclass(frozen=True)
class SampleLength:
    """Token counts of one rendered sample (or the sum over the samples of a packed record)."""

    tokens: int  # len(input_ids)
    text_tokens: int  # tokens that are not image/video placeholders
    visual_tokens: int  # <|image_pad|> and <|video_pad|> tokens
    vision_patches: int  # rows of pixel_values(+_videos): what the vision tower's cost follows
    scale: float = 1.0  # below 1 when the media are shrunk to fit model_max_length

    def row(self) -> tuple[int, int, int]:
        return self.tokens, self.visual_tokens, self.vision_patches

    def __add__(self, other: "SampleLength") -> "SampleLength":
        return SampleLength(self.tokens + other.tokens, self.text_tokens + other.text_tokens,
                            self.visual_tokens + other.visual_tokens, self.vision_patches + other.vision_patches,
                            min(self.scale, other.scale))


class MediaError(DataError):
    """A media file that is missing or unreadable; its ``kind`` says which (a media ``DataKind``)."""

    default_kind = DataKind.BAD_VIDEO


# --------------------------------------------------------------------------- media sizes

def image_size(ref: Any, origin: str | None = None, verify: bool = False,
               timeout_s: float | None = DEFAULT_MEDIA_TIMEOUT_S) -> tuple[int, int]:
    """(height, width) of an image as displayed, from its header; ``verify`` also decodes the pixels.

    ``ref`` is a resolved media reference (path, fsspec URL or PIL image).  Problems
    raise the ``DataError`` (with its kind) that ``open_image`` raises in training.
    """
    return image_header(ref, origin, verify=verify, timeout_s=timeout_s)


@dataclass(frozen=True)
class VideoProbe:
    """What the token count of a video depends on: its frame count, rate and frame size."""

    total_frames: int
    fps: float
    height: int
    width: int


def first_frame(total: int, fps: float) -> list[int]:
    """The frame plan of ``probe_video``: the first frame only (a module-level function: it runs in the reader)."""
    return [0]


def probe_video(ref: Any, settings, origin: str | None = None) -> VideoProbe:
    """Frame count, rate and native frame size of a video, decoding one frame.

    Goes through the decoder training uses (``settings.backend``, with ``auto``'s
    fallbacks), so the frame count is the one ``load_video`` will sample from.
    Frame-image videos (a folder or a list of images) read one image header.
    """
    try:
        if isinstance(ref, (list, tuple)) or (isinstance(ref, (str, os.PathLike))
                                              and os.path.isdir(local_path(os.fspath(ref)))):
            paths = ([local_path(os.fspath(p)) for p in ref] if isinstance(ref, (list, tuple))
                     else list_frame_folder(local_path(os.fspath(ref))))
            if not paths:
                raise MediaError("a video given as a list of frame images has no frames; list at least one image")
            for index, path in enumerate(paths):
                if not is_url(path) and not os.path.isfile(path):
                    raise MediaError(f"{where(file=path)}: frame {index} of video {paths[0]} not found; check the "
                                     "frame list or folder", "missing_media")
            height, width = image_size(paths[0], timeout_s=settings.timeout_s)
            return VideoProbe(len(paths), float(settings.frame_list_fps), height, width)
        name = local_path(os.fspath(ref))
        if is_url(name):
            with fetched(name, settings.timeout_s) as path:
                decoded, _ = decode_video(path, first_frame, settings.backend, settings.timeout_s,
                                          settings.num_threads, label=name)
        else:
            decoded, _ = decode_video(name, first_frame, settings.backend, settings.timeout_s, settings.num_threads)
    except DataError as e:
        if e.kind is DataKind.BAD_IMAGE:  # the first frame image of a frame-list video
            e.kind = DataKind.BAD_VIDEO
        if origin and origin not in str(e):
            e.args = (f"{origin}: {e}",)  # the same error, its kind kept, located
        raise
    _, _, height, width = decoded.frames.shape
    return VideoProbe(decoded.total_frames, decoded.source_fps, int(height), int(width))


# --------------------------------------------------------------------------- counting

class TokenCounter:
    """Count the tokens ``SampleRenderer.render`` would produce, from media sizes only.

    ``processor`` must be configured as for training (``configure_processor``);
    ``video_settings`` are the renderer's (``video_settings_from(data_args, processor)``).
    Calling the counter returns a ``SampleLength`` or raises the ``DataError`` that
    rendering would raise (``SampleTooLong`` included).
    """

    def __init__(self, processor, video_settings=None, model_max_length: int | None = None, grounding=None,
                 thinking: str = "auto"):
        self.processor = processor
        self.video_settings = video_settings
        self.model_max_length = model_max_length
        self.thinking = thinking
        self.tokens = SpecialTokens.from_tokenizer(processor.tokenizer)
        self.grounding = grounding  # the renderer's box/point rewriting (converted numbers change the count)
        self.chat = ChatRender(processor, thinking)

    @classmethod
    def for_renderer(cls, renderer: SampleRenderer, model_max_length: int | None | str = "renderer") -> "TokenCounter":
        """A counter with the renderer's processor, video settings, thinking mode and (by default) max length."""
        max_length = renderer.model_max_length if model_max_length == "renderer" else model_max_length
        return cls(renderer.processor, renderer.video_settings, max_length, getattr(renderer, "grounding", None),
                   renderer.thinking)

    def with_max_length(self, model_max_length: int | None) -> "TokenCounter":
        return TokenCounter(self.processor, self.video_settings, model_max_length, self.grounding, self.thinking)

    # -- media -----------------------------------------------------------------------
    def _video_plan(self, probe: VideoProbe) -> tuple[int, int, int, list[int]]:
        """(frames, height, width, frame indices) of a video as ``load_video`` delivers it."""
        indices = sample_frame_indices(probe.total_frames, probe.fps, self.video_settings)
        try:
            height, width = frame_size(probe.height, probe.width, len(indices), self.video_settings)
        except ValueError as e:
            raise MediaError(str(e), "bad_video") from None
        return len(indices), height, width, indices

    def media(self, conversation: Conversation) -> tuple[list, list]:
        """The image sizes and planned videos of a conversation (reads headers, one frame per video)."""
        _, image_refs, video_refs = template_messages(conversation)
        timeout_s = getattr(self.video_settings, "timeout_s", DEFAULT_MEDIA_TIMEOUT_S)  # --media_timeout
        images = [image_size(ref, conversation.origin, timeout_s=timeout_s) for ref in image_refs]
        if video_refs and self.video_settings is None:
            raise ValueError("counting a video needs the video settings (video_settings_from(data_args, processor))")
        videos = []
        for ref in video_refs:
            probe = probe_video(ref, self.video_settings, conversation.origin)
            videos.append((probe, self._video_plan(probe)))
        return images, videos

    # -- sizes at a scale ------------------------------------------------------------
    # These mirror SampleRenderer._process / _video_inputs: at ``scale`` < 1 every image
    # is bounded by ``scale`` times the largest image's full-resolution pixels, and the
    # frames of every video are refitted by the video module to ``scale`` times theirs.
    def _image_patches(self, height: int, width: int, scale: float, image_pixels: int) -> int:
        image = self.processor.image_processor
        kwargs = {}
        if scale < 1.0:
            low = image.size["shortest_edge"]
            kwargs = {"min_pixels": low, "max_pixels": max(low, int(image_pixels * scale))}
        return int(image.get_number_of_image_patches(height, width, kwargs))

    def _video_size(self, frames: int, height: int, width: int, scale: float) -> tuple[int, int]:
        if scale >= 1.0:
            return height, width
        settings = self.video_settings
        smaller = max(settings.min_pixels or 0, int(width * height * scale))
        return frame_size(height, width, frames, dataclasses.replace(settings, max_pixels=smaller))

    def _expand(self, images: list, videos: list, scale: float, image_pixels: int) -> tuple[list, list, list, int]:
        """The processor's own placeholder expansions (image, video) for the counted grids, the
        patches of each image, and the patches of all videos."""
        processor = self.processor
        image_repl, video_repl, video_patches = [], [], 0
        counts = [self._image_patches(h, w, scale, image_pixels) for h, w in images]
        if counts:
            # Only the product of a grid matters to the replacement; (1, n, 1) keeps it.
            grids = {"image_grid_thw": np.array([[1, n, 1] for n in counts], dtype=np.int64)}
            image_repl = [processor.replace_image_token(grids, image_idx=i) for i in range(len(counts))]
        if videos:
            video = processor.video_processor
            rows, metadata = [], []
            for probe, (frames, height, width, indices) in videos:
                # The processor is told not to resize (PROCESSOR_VIDEO_KWARGS): the grid is the frame size.
                height, width = self._video_size(frames, height, width, scale)
                grid_t = -(-frames // video.temporal_patch_size)
                rows.append([grid_t, height // video.patch_size, width // video.patch_size])
                video_patches += grid_t * (height // video.patch_size) * (width // video.patch_size)
                metadata.append(VideoMetadata(
                    total_num_frames=probe.total_frames, fps=probe.fps, width=width, height=height,
                    duration=probe.total_frames / probe.fps, frames_indices=list(indices)))
            grids = {"video_grid_thw": np.array(rows, dtype=np.int64), "video_metadata": metadata}
            video_repl = [processor.replace_video_token(grids, video_idx=i) for i in range(len(rows))]
        return image_repl, video_repl, counts, video_patches

    def count(self, conversation: Conversation, media: tuple[list, list] | None = None) -> SampleLength:
        """The sample's length; ``media`` (from ``self.media``) skips re-reading the headers."""
        parts = self.chat.split(conversation)
        # A Qwen3.5 record trained per reasoning turn: its samples side by side; one part that is a prefix
        # (the turns after it untrained) is counted as itself, its own media read (media are the whole record's).
        if len(parts) > 1 or parts[0] is not conversation:
            total = SampleLength(0, 0, 0, 0)
            for part in parts:
                total = total + self.count(part)
            return total
        pieces = self.chat.pieces(conversation)
        images, videos = media if media is not None else self.media(conversation)
        image_pixels = 0  # the largest image's pixels at full resolution (the first measurement)

        def measure(scale: float) -> Measured:
            nonlocal image_pixels
            scale_pieces = pieces
            if self.grounding is not None:  # boxes/points as the renderer rewrites them at this scale
                low = self.processor.image_processor.size["shortest_edge"]
                size = None if scale >= 1.0 else {"shortest_edge": low,
                                                  "longest_edge": max(low, int(image_pixels * scale))}
                grounded, _ = self.grounding.for_sizes(conversation, [(w, h) for h, w in images], size)
                if grounded is not conversation:
                    scale_pieces = self.chat.pieces(grounded)
            image_repl, video_repl, image_patches, video_patches = self._expand(images, videos, scale, image_pixels)
            if scale == 1.0 and image_patches:
                patch = self.processor.image_processor.patch_size
                image_pixels = max(image_patches) * patch * patch
            ids, trained = self.chat.tokens(scale_pieces, image_repl, video_repl)
            ids = np.asarray(ids, dtype=np.int64)
            visual = int(np.count_nonzero((ids == self.tokens.image_pad) | (ids == self.tokens.video_pad)))
            return Measured(int(ids.size), visual, (int(ids.size), visual, trained,
                                                    sum(image_patches) + video_patches))

        # The renderer's rule on counted sizes: the same scale, length and SampleTooLong as rendering.
        (length, visual, trained, patches), scale = fit_to_context(measure, self.model_max_length,
                                                                   conversation.origin)
        if not any(trained):
            raise DataError(f"{conversation.origin}: no assistant reply left to train on (the conversation needs "
                            f"at least one assistant/gpt turn with text).", DataKind.NO_ASSISTANT)
        return SampleLength(length, length - visual, visual, patches, scale)

    def __call__(self, conversation: Conversation | list[Conversation]) -> SampleLength:
        if isinstance(conversation, list):  # a packed record: its samples side by side
            total = SampleLength(0, 0, 0, 0)
            for c in conversation:
                total = total + self.count(c)
            return total
        return self.count(conversation)


def count_tokens(conversation: Conversation | list[Conversation], processor, video_settings=None,
                 model_max_length: int | None = None, thinking: str = "auto") -> SampleLength:
    """Exact ``SampleLength`` of a conversation (or packed list), without decoding pixels.

    Equal to what ``SampleRenderer(processor, ..., model_max_length, video_settings).render``
    produces: ``tokens == len(input_ids)``, ``visual_tokens`` the image/video
    placeholders, ``vision_patches`` the rows of the pixel tensors.  For many samples,
    build one ``TokenCounter`` and call it.
    """
    return TokenCounter(processor, video_settings, model_max_length, thinking=thinking)(conversation)


# --------------------------------------------------------------------------- one record

def measure_record(source, spec: DatasetSpec, index: int, counter: TokenCounter) -> tuple:
    """``((tokens, visual, patches), None, None)`` for a good record, ``(None, reason, kind)`` for a bad one.

    Bad means what training's skip policy skips (``errors.bad_sample``: a ``DataError``,
    which covers what the processor would refuse); any other exception is a bug and
    propagates, never cached as a "bad record".
    """
    try:
        return counter(conversation_of(source, spec, index)).row(), None, None
    except Exception as e:
        err = bad_sample(e)
        if err is None:
            raise
        reason = str(err)
        at = where(spec.name, spec.annotation_path, index)
        return None, reason if at in reason or spec.annotation_path in reason else f"{at}: {reason}", err.kind.value
