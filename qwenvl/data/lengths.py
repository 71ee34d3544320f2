"""Exact token counts of samples without decoding pixels, and the per-file length cache.

``count_tokens(conversation, processor)`` gives what ``SampleRenderer.render`` would
produce (``input_ids`` length, visual tokens, vision-tower patches) from the media
*sizes* alone:

* images: the size in the file header (``PIL.Image.open(...).size``, no ``load()``),
  or a PIL image's ``.size``; the grid follows from the image processor's own
  ``get_number_of_image_patches`` (its resize rule and pixel bounds);
* videos: frame count, frame rate and frame size from the decoder used for training,
  which decodes one frame; the frames sampled and their size come from
  ``qwenvl.data.video`` (the rules ``load_video`` applies); the processor does not
  resize them again, so the grid is the frame size over the patch size;
* text: the renderer's own ``ChatRender`` (the same chat pieces, the same piece-aware
  tokenization), with each placeholder replaced by the processor's own
  ``replace_image_token`` / ``replace_video_token`` (Qwen3-VL writes a
  ``<t seconds>`` label per video frame there) fed with the counted grids; so the
  count is the renderer's, labels and literal special-token text included.

With ``model_max_length`` the renderer's shrink loop is replayed on the same
numbers, so an over-long sample gets the length it will be rendered at, or raises
``SampleTooLong`` exactly when rendering would.

The length cache (``load_or_build_lengths``) keeps one row per record of an
annotation file: ``[tokens, visual_tokens, vision_patches]`` at full resolution
(``BAD`` in every column for a record that cannot be rendered; the reason is kept in
the meta file).  It lives next to the annotation file as
``<annotation>.lengths.<key>.npy`` + ``.json``, or under
``$XDG_CACHE_HOME/qwenvl/lengths`` (default ``~/.cache``) when that folder is not
writable.  ``key`` hashes the annotation file's size and mtime, the dataset's
data_path, the processor (family, tokenizer, chat template, pixel bounds, patch and
merge sizes), the video settings, and the code that decides lengths (transformers'
version and the source of the rendering modules): a cache that no longer matches is
never found, so it is rebuilt.  ``model_max_length`` is *not* part of the key: the rows stay valid
for every budget, and the few records above a given budget are recounted exactly
(shrunk, or marked bad) when the table is loaded for it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .conversation_checks import check_conversation
from .errors import DataError, DataKind, bad_sample, where
from .formats import Conversation, to_conversation, to_conversations
from .media import DEFAULT_MEDIA_TIMEOUT_S, image_header, is_url
from .registry import DatasetSpec
from .prompt import template_messages
from .render import ChatRender, SampleRenderer, SampleTooLong, SpecialTokens

logger = logging.getLogger(__name__)

__all__ = [
    "SampleLength", "MediaError", "TokenCounter", "count_tokens", "image_size", "VideoProbe", "probe_video",
    "TOKENS", "VISUAL", "PATCHES", "BAD", "LengthTable", "lengths_key", "counter_settings", "load_lengths",
    "save_lengths", "build_lengths", "fit_to_max_length", "lengths_for", "load_or_build_lengths",
    "dataset_lengths", "parallel_chunks", "chunk_ranges", "conversation_of", "measure_record",
]

# 2: the kind of each bad record is kept; only bad data is cached, never a bug.
# 3: labels built while rendering, literal special-token text tokenized as text.
LENGTHS_VERSION = 3
TOKENS, VISUAL, PATCHES = 0, 1, 2  # columns of a length table
BAD = -1  # every column of a record that cannot be rendered


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


def probe_video(ref: Any, settings, origin: str | None = None) -> VideoProbe:
    """Frame count, rate and native frame size of a video, decoding one frame.

    Goes through the decoder training uses (``settings.backend``, with ``auto``'s
    fallbacks), so the frame count is the one ``load_video`` will sample from.
    Frame-image videos (a folder or a list of images) read one image header.
    """
    from .video_decode import decode_video, fetched, list_frame_folder, local_path

    def first_frame(total: int, fps: float) -> list[int]:
        return [0]

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
        from .video import frame_size, sample_frame_indices

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
        from .video import frame_size

        settings = self.video_settings
        smaller = max(settings.min_pixels or 0, int(width * height * scale))
        return frame_size(height, width, frames, dataclasses.replace(settings, max_pixels=smaller))

    def _expand(self, images: list, videos: list, scale: float, image_pixels: int) -> tuple[list, list, list, int]:
        """The processor's own placeholder expansions (image, video) for the counted grids, the
        patches of each image, and the patches of all videos."""
        from transformers.video_utils import VideoMetadata

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
        if len(parts) > 1:  # a Qwen3.5 record trained per reasoning turn: its samples side by side
            total = SampleLength(0, 0, 0, 0)
            for part in parts:
                total = total + self.count(part)
            return total
        pieces = self.chat.pieces(conversation)
        images, videos = media if media is not None else self.media(conversation)
        scale, image_pixels, max_length = 1.0, 0, self.model_max_length
        # Replays SampleRenderer.encode's loop on the same numbers, so the result is its result.
        for _attempt in range(SampleRenderer.SHRINK_ATTEMPTS + 1):
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
            length = int(ids.size)
            visual = int(np.count_nonzero((ids == self.tokens.image_pad) | (ids == self.tokens.video_pad)))
            if max_length is None or length <= max_length:
                break
            text_len = length - visual
            if visual == 0 or text_len >= max_length:
                raise SampleTooLong(
                    f"{conversation.origin}: {length} tokens ({text_len} of text) do not fit --model_max_length "
                    f"{max_length}; the text alone is too long, so the sample is dropped. Raise "
                    f"--model_max_length or shorten the sample.")
            scale *= max(0.05, 0.9 * (max_length - text_len) / visual)
        else:
            raise SampleTooLong(
                f"{conversation.origin}: {length} tokens do not fit --model_max_length {max_length} even at the "
                f"lowest resolution --min_pixels allows; the sample is dropped. Raise --model_max_length or lower "
                f"--min_pixels.")
        if not any(trained):
            raise DataError(f"{conversation.origin}: no assistant reply left to train on (the conversation needs "
                            f"at least one assistant/gpt turn with text).", DataKind.NO_ASSISTANT)
        return SampleLength(length, length - visual, visual, sum(image_patches) + video_patches, scale)

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


# --------------------------------------------------------------------------- parallel map

_WORKER: tuple | None = None  # (function, state) inherited by forked workers


def _init_worker() -> None:
    torch.set_num_threads(1)  # workers are processes; threads inside them would oversubscribe


def _run_task(task):
    fn, state = _WORKER
    return fn(state, task)


def parallel_chunks(fn: Callable[[Any, Any], Any], state: Any, tasks: Sequence, num_workers: int = 0,
                    on_result: Callable[[Any, Any], None] | None = None) -> list:
    """``[fn(state, task) for task in tasks]``, in order, on ``num_workers`` forked processes.

    ``state`` (sources, processor, ...) reaches the workers through ``fork``, never
    pickled; tasks and results are small and pickled.  ``num_workers <= 1`` or a
    platform without ``fork`` runs in this process.  ``on_result(task, result)`` is
    called in order as results arrive (progress bars).
    """
    global _WORKER
    results = []
    if num_workers <= 1 or len(tasks) <= 1 or "fork" not in mp.get_all_start_methods():
        for task in tasks:
            result = fn(state, task)
            if on_result:
                on_result(task, result)
            results.append(result)
        return results
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fork after Rust threads: keep them off
    _WORKER = (fn, state)
    try:
        with mp.get_context("fork").Pool(min(num_workers, len(tasks)), initializer=_init_worker) as pool:
            for task, result in zip(tasks, pool.imap(_run_task, tasks, chunksize=1)):
                if on_result:
                    on_result(task, result)
                results.append(result)
    finally:
        _WORKER = None
    return results


def chunk_ranges(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(n, start + chunk)) for start in range(0, n, chunk)]


# --------------------------------------------------------------------------- one record

def conversation_of(source, spec: DatasetSpec, index: int):
    """The checked Conversation (or list, for a packed record) of record ``index``; raises DataError.

    The checks are training's (``conversation_checks.check_conversation``), so a record
    training refuses is bad here too.
    """
    record = source[index]
    if getattr(source, "is_packed", False) or isinstance(record, list):
        conversations = to_conversations(record, spec, index)
        for c in conversations:
            check_conversation(c)
        return conversations
    conversation = to_conversation(record, spec, index)
    check_conversation(conversation)
    return conversation


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


def _measure_chunk(state, task):
    source, spec, counter = state
    start, stop = task
    return [measure_record(source, spec, i, counter) for i in range(start, stop)]


# --------------------------------------------------------------------------- the cache

@dataclass
class LengthTable:
    """Lengths of every record of one annotation file: ``rows`` (n, 3) int64 and the bad records' reasons."""

    rows: np.ndarray
    errors: dict[int, str]
    path: str | None = None  # where it was loaded from or saved to
    kinds: dict[int, str] = dataclasses.field(default_factory=dict)  # bad record -> DataKind value

    @property
    def tokens(self) -> np.ndarray:
        return self.rows[:, TOKENS]

    @classmethod
    def from_results(cls, results: Iterable[tuple]) -> "LengthTable":
        """From ``(row, reason)`` or ``(row, reason, kind)`` per record (``row`` None when bad)."""
        rows, errors, kinds = [], {}, {}
        for i, (row, error, *kind) in enumerate(results):
            if row is None:
                errors[i] = error or "unknown problem"
                kinds[i] = (kind[0] if kind and kind[0] else DataKind.MALFORMED.value)
                rows.append((BAD, BAD, BAD))
            else:
                rows.append(row)
        return cls(np.asarray(rows, dtype=np.int64).reshape(-1, 3), errors, kinds=kinds)


def _cache_root() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "qwenvl" / "lengths"


def _file_stamp(path: str) -> dict:
    """Size and mtime of the annotation file (every file of a saved HF dataset folder)."""
    if is_url(path):
        import fsspec
        fs, p = fsspec.core.url_to_fs(path)
        info = fs.info(p)
        return {"size": int(info.get("size") or 0), "etag": str(info.get("ETag") or info.get("etag") or "")}
    if os.path.isdir(path):
        files = sorted(os.scandir(path), key=lambda e: e.name)
        return {"files": [[e.name, e.stat().st_size, e.stat().st_mtime_ns] for e in files if e.is_file()]}
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


_TOKENIZER_HASHES: dict[int, str] = {}


def _tokenizer_hash(tokenizer) -> str:
    """A hash of the whole tokenizer (vocabulary, merges, added tokens), computed once per object."""
    key = id(tokenizer)
    if key not in _TOKENIZER_HASHES:
        backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
        if backend is not None and hasattr(backend, "to_str"):
            text = backend.to_str()
        else:
            text = json.dumps(sorted(tokenizer.get_vocab().items()))
        _TOKENIZER_HASHES[key] = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return _TOKENIZER_HASHES[key]


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


_CODE_HASH: list[str] = []
# The modules whose rules decide a sample's tokens: when any of them changes (an upgrade),
# cached lengths may be wrong, so their source is part of the key.
_RULE_MODULES = ("lengths.py", "render.py", "chat_pieces.py", "piece_tokens.py", "prompt.py", "formats.py",
                 "media.py", "video.py", "grounding.py", "video_decode.py", "video_checks.py", "conversation_checks.py")


def _code_hash() -> str:
    if not _CODE_HASH:
        import transformers
        digest = hashlib.sha256(transformers.__version__.encode())
        for name in _RULE_MODULES:
            try:
                digest.update((Path(__file__).parent / name).read_bytes())
            except OSError:
                digest.update(name.encode())
        _CODE_HASH.append(digest.hexdigest()[:16])
    return _CODE_HASH[0]


def counter_settings(counter: TokenCounter) -> dict:
    """Everything about the counter that changes a record's length (the cache key's settings part)."""
    processor = counter.processor
    image = processor.image_processor
    settings = {
        "code": _code_hash(),  # transformers' version and our rendering rules
        "processor": type(processor).__name__,
        "tokenizer": [type(processor.tokenizer).__name__, len(processor.tokenizer), _tokenizer_hash(processor.tokenizer)],
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


def _cache_candidates(annotation_path: str, key: str) -> list[Path]:
    """Where a cache may live: next to the annotation file, then the user cache folder."""
    ann = annotation_path.rstrip("/")
    name = f"{os.path.basename(ann)}.lengths.{key}.npy"
    digest = hashlib.sha1(os.path.abspath(ann).encode("utf-8")).hexdigest()[:16]
    fallback = _cache_root() / f"{digest}-{name}"
    if is_url(ann):
        return [fallback]
    return [Path(os.path.dirname(os.path.abspath(ann))) / name, fallback]


def _meta_path(npy: Path) -> Path:
    return npy.with_suffix(".json")


def load_lengths(spec: DatasetSpec, counter: TokenCounter, records: int | None = None) -> LengthTable | None:
    """The cached table of ``spec`` for ``counter``'s settings, or None (absent, stale, unreadable)."""
    key, _ = lengths_key(spec, counter)
    for path in _cache_candidates(spec.annotation_path, key):
        try:
            meta = json.loads(_meta_path(path).read_text())
            rows = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            continue
        ok = (meta.get("key") == key and rows.dtype == np.int64 and rows.ndim == 2 and rows.shape[1] == 3
              and rows.shape[0] == meta.get("records") and (records is None or rows.shape[0] == records))
        if ok:
            return LengthTable(rows, {int(k): v for k, v in meta.get("errors", {}).items()}, str(path),
                               {int(k): v for k, v in meta.get("kinds", {}).items()})
        logger.info("ignoring the length cache %s: it does not match its file", path)
    return None


def _remove_stale(directory: Path, prefix: str, keep: Path, stamp: dict) -> None:
    """Delete caches of the same annotation file built from an older version of it."""
    try:
        candidates = list(directory.glob(f"{prefix}.lengths.*.json"))
    except OSError:
        return
    for meta_path in candidates:
        if meta_path == _meta_path(keep):
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("stamp") != stamp:
            for p in (meta_path, meta_path.with_suffix(".npy")):
                try:
                    p.unlink()
                except OSError:
                    pass


def save_lengths(spec: DatasetSpec, counter: TokenCounter, table: LengthTable, seconds: float | None = None) -> Path | None:
    """Write ``table`` to the cache (next to the annotation file, else the user cache); returns the path."""
    key, meta = lengths_key(spec, counter)
    meta.update(key=key, records=int(table.rows.shape[0]), columns=["tokens", "visual_tokens", "vision_patches"],
                errors={str(k): v for k, v in sorted(table.errors.items())},
                kinds={str(k): v for k, v in sorted(table.kinds.items())}, built_s=seconds)
    for path in _cache_candidates(spec.annotation_path, key):
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp_meta = path.with_name(f"{path.name}.{os.getpid()}.json.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(table.rows, dtype=np.int64))
            tmp_meta.write_text(json.dumps(meta, indent=1))
            # The rows first, then the meta that vouches for them: a reader that finds
            # the meta finds matching rows (both renames are atomic).
            os.replace(tmp, path)
            os.replace(tmp_meta, _meta_path(path))
        except OSError:
            for p in (tmp, tmp_meta):
                try:
                    p.unlink()
                except OSError:
                    pass
            continue
        prefix = path.name.split(".lengths.")[0]
        _remove_stale(path.parent, prefix, path, meta["stamp"])
        table.path = str(path)
        return path
    logger.warning("could not write the length cache of %s anywhere; it will be rebuilt next time",
                   spec.annotation_path)
    return None


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="rec", leave=False)


def build_lengths(spec: DatasetSpec, source, counter: TokenCounter, num_workers: int = 0, chunk: int = 64,
                  progress: bool = True) -> LengthTable:
    """Count every record of ``source`` at full resolution (no max length), in parallel."""
    full = counter.with_max_length(None)
    bar = _progress(len(source), f"lengths {spec.name}", progress)
    results = parallel_chunks(_measure_chunk, (source, spec, full), chunk_ranges(len(source), chunk), num_workers,
                              on_result=(lambda t, r: bar.update(len(r))) if bar else None)
    if bar:
        bar.close()
    return LengthTable.from_results(r for chunk_results in results for r in chunk_results)


def fit_to_max_length(table: LengthTable, spec: DatasetSpec, source, counter: TokenCounter,
                      model_max_length: int | None) -> LengthTable:
    """The table as rendered under ``model_max_length``: rows above it recounted (shrunk, or bad)."""
    if model_max_length is None:
        return table
    over = np.flatnonzero(table.rows[:, TOKENS] > model_max_length)
    if over.size == 0:
        return table
    rows, errors, kinds = table.rows.copy(), dict(table.errors), dict(table.kinds)
    exact = counter.with_max_length(model_max_length)
    for i in over.tolist():
        row, error, kind = measure_record(source, spec, i, exact)
        if row is None:
            rows[i] = BAD
            errors[i] = error
            kinds[i] = kind
        else:
            rows[i] = row
    return LengthTable(rows, errors, table.path, kinds)


def lengths_for(spec: DatasetSpec, source, counter: TokenCounter, num_workers: int = 0,
                progress: bool = True, rebuild: bool = False) -> LengthTable:
    """The table of ``spec`` under ``counter`` (its max length applied), from the cache or built and cached."""
    table = None if rebuild else load_lengths(spec, counter, len(source))
    if table is None:
        start = time.perf_counter()
        table = build_lengths(spec, source, counter, num_workers, progress=progress)
        save_lengths(spec, counter, table, round(time.perf_counter() - start, 3))
    return fit_to_max_length(table, spec, source, counter, counter.model_max_length)


def load_or_build_lengths(spec: DatasetSpec, source, processor, data_args, num_workers: int = 0,
                          model_max_length: int | None = None, progress: bool = True) -> np.ndarray:
    """(n_records, 3) int64 ``[tokens, visual_tokens, vision_patches]`` of every record of ``spec``.

    ``spec`` is a ``DatasetSpec`` (or a ``MixtureEntry``), ``source`` its open
    ``AnnotationSource``; ``processor`` is configured from ``data_args`` first (as
    training does).  Rows of records that cannot be rendered are ``BAD`` (-1).
    """
    from .dataset import video_settings_from
    from .processor_settings import configure_processor

    spec = getattr(spec, "spec", spec)
    configure_processor(processor, data_args)
    counter = TokenCounter(processor, video_settings_from(data_args, processor), model_max_length,
                           thinking=getattr(data_args, "enable_thinking", "auto"))
    return lengths_for(spec, source, counter, num_workers, progress).rows


def dataset_lengths(dataset, num_workers: int = 0, progress: bool = True) -> tuple[np.ndarray, dict[int, str]]:
    """Per-item lengths of a ``SupervisedDataset`` (its mixture order), and the bad items' reasons.

    Returns ``(rows, bad)``: ``rows`` is (len(dataset), 3) int64 as in
    ``load_or_build_lengths``, under the renderer's settings and max length; ``bad``
    maps item index -> reason for items that cannot be rendered (their rows are BAD).
    """
    counter = TokenCounter.for_renderer(dataset.renderer)
    tables = [lengths_for(entry.spec, source, counter, num_workers, progress)
              for entry, source in zip(dataset.entries, dataset.sources)]
    mixture = np.asarray(dataset.mixture, dtype=np.int64).reshape(-1, 2)
    rows = np.full((mixture.shape[0], 3), BAD, dtype=np.int64)
    bad: dict[int, str] = {}
    for d, table in enumerate(tables):
        items = np.flatnonzero(mixture[:, 0] == d)
        rows[items] = table.rows[mixture[items, 1]]
        for item in items[rows[items, TOKENS] < 0].tolist():
            bad[item] = table.errors.get(int(mixture[item, 1]), "unknown problem")
    return rows, bad
