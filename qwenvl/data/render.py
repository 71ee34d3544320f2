"""One conversation -> the tensors the model trains on, for every family and batching mode.

The model's own processor and chat template do the rendering, so the ``input_ids``
of a sample are exactly what ``processor.apply_chat_template(messages,
tokenize=True)`` gives at inference.  Labels are then read off the rendering:
each ``<|im_start|>assistant\\n`` header opens a trained span that closes with (and
includes) the next ``<|im_end|>``.  Both markers are looked up by name in the
tokenizer; no token id is written in this file.

Example (Qwen2.5-VL, one image)::

    text:   <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
            <|im_start|>user\\n<|vision_start|><|image_pad|>x16<|vision_end|>What colour?<|im_end|>\\n
            <|im_start|>assistant\\nred<|im_end|>\\n
    labels: -100 everywhere except  "red" and "<|im_end|>"
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import DataError, DataKind
from .formats import Conversation
from .grounding import Grounding
from .media import DEFAULT_MEDIA_TIMEOUT_S, open_image
from .prompt import chat_text
from .rope import RopeIndex

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy skips


@dataclass(frozen=True)
class SpecialTokens:
    """The ids the renderer needs, looked up by name once."""

    im_start: int
    im_end: int
    assistant_header: tuple[int, ...]  # "<|im_start|>assistant\n" as the tokenizer splits it
    image_pad: int
    video_pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialTokens":
        ids = {name: tokenizer.convert_tokens_to_ids(name)
               for name in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>")}
        missing = [name for name, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"The tokenizer has no {', '.join(missing)} token: is this a Qwen-VL checkpoint?")
        header = tuple(tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
        return cls(ids["<|im_start|>"], ids["<|im_end|>"], header, ids["<|image_pad|>"], ids["<|video_pad|>"])


class SampleTooLong(DataError):
    """A sample that does not fit ``model_max_length`` even at the lowest allowed resolution."""

    default_kind = DataKind.TOO_LONG


def assistant_labels(input_ids: torch.Tensor, tokens: SpecialTokens) -> torch.Tensor:
    """Labels that train every assistant reply, closing ``<|im_end|>`` included, and nothing else."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    ids = input_ids.tolist()
    header = list(tokens.assistant_header)
    n, h = len(ids), len(header)
    i = 0
    while i <= n - h:
        if ids[i] == tokens.im_start and ids[i:i + h] == header:
            start = i + h
            end = start
            while end < n and ids[end] != tokens.im_end:
                end += 1
            stop = min(end + 1, n)  # include <|im_end|> when present
            labels[start:stop] = input_ids[start:stop]
            i = stop
        else:
            i += 1
    return labels



class SampleRenderer:
    """Render conversations into model inputs with a family's processor.

    ``render(conversation)`` returns a dict of tensors for one sample:
    ``input_ids`` (L,), ``labels`` (L,), ``position_ids`` (3, L) and, when the
    sample has them, ``pixel_values`` + ``image_grid_thw`` and
    ``pixel_values_videos`` + ``video_grid_thw`` (+ ``second_per_grid_ts`` on
    Qwen2.5-VL).  The collators only stack or concatenate these.
    """

    # How often a too-long sample is retried at a lower resolution before it is dropped.
    SHRINK_ATTEMPTS = 6

    def __init__(self, processor, model_config, model_max_length: int | None = None, video_settings=None):
        self.processor = processor
        self.tokens = SpecialTokens.from_tokenizer(processor.tokenizer)
        self.rope = RopeIndex(model_config)
        self.model_max_length = model_max_length
        self.video_settings = video_settings
        # Boxes and points are rewritten into the family's coordinates for each image as resized.
        self.grounding = Grounding(getattr(model_config, "model_type", None), processor.image_processor)

    # -- media -----------------------------------------------------------------------
    def _load_videos(self, refs: list, origin: str) -> list:
        from .video import load_video

        return [load_video(ref, self.video_settings, origin=origin) for ref in refs]

    def _video_inputs(self, clips: list, scale: float):
        """Frames and metadata for the processor; ``scale`` < 1 refits frames to fewer pixels.

        Frames are sized here, per frame, and the processor is told not to resize them
        again: Qwen3-VL's video processor reads its pixel bounds as a budget for the
        whole video, so resizing there would change the meaning of --video_max_pixels.
        """
        import dataclasses

        from .video import processor_video_inputs, resize_clip

        frames, metadata = [], []
        for clip in clips:
            if scale < 1.0:
                settings = self.video_settings
                smaller = max(settings.min_pixels or 0, int(clip.frames.shape[-1] * clip.frames.shape[-2] * scale))
                clip = resize_clip(clip, dataclasses.replace(settings, max_pixels=smaller))
            clip_frames, clip_meta = processor_video_inputs(clip)
            frames.append(clip_frames)
            metadata.append(clip_meta)
        return frames, metadata

    # -- rendering -------------------------------------------------------------------
    def _image_size(self, scale: float, image_pixels: int) -> dict | None:
        """The pixel bounds images are resized into at ``scale`` (None: the processor's own), as ``_process`` sets."""
        if scale >= 1.0:
            return None
        size = self.processor.image_processor.size
        return {"shortest_edge": size["shortest_edge"],
                "longest_edge": max(size["shortest_edge"], int(image_pixels * scale))}

    def _process(self, text: str, images: list, clips: list, scale: float, image_pixels: int = 0) -> dict:
        """Run the processor; with ``scale`` < 1 every image is bounded by ``scale`` times
        ``image_pixels`` (the largest image's pixels at full resolution), never below
        --min_pixels."""
        from .video import processor_videos_kwargs

        kwargs = {}
        if images:
            kwargs["images"] = images
            if scale < 1.0:
                size = self.processor.image_processor.size
                kwargs["images_kwargs"] = {"size": {
                    "shortest_edge": size["shortest_edge"],
                    "longest_edge": max(size["shortest_edge"], int(image_pixels * scale))}}
        if clips:
            frames, metadata = self._video_inputs(clips, scale)
            kwargs["videos"] = frames
            kwargs["videos_kwargs"] = processor_videos_kwargs(metadata)
        return self.processor(text=[text], return_tensors="pt", **kwargs)

    def render(self, conversation: Conversation) -> dict:
        """Tensors for one conversation (see the class docstring); raises DataError on bad input."""
        return self._finish(self.encode(conversation), conversation)

    def encode(self, conversation: Conversation, add_generation_prompt: bool = False):
        """The processor's outputs (ids, pixels, grids) for ``conversation``, shrunk to fit if needed.

        ``add_generation_prompt=True`` is the prompt a generation continues from (the chat
        and evaluation tools): the same text, media and processor call as training, plus
        the assistant header, so its ids are a prefix of the trained sample's ids.
        """
        text, image_refs, video_refs = chat_text(self.processor, conversation, add_generation_prompt)
        timeout_s = getattr(self.video_settings, "timeout_s", DEFAULT_MEDIA_TIMEOUT_S)  # --media_timeout
        images = [open_image(ref, origin=conversation.origin, timeout_s=timeout_s) for ref in image_refs]
        clips = self._load_videos(video_refs, conversation.origin) if video_refs else []

        scale, image_pixels = 1.0, 0
        for _attempt in range(self.SHRINK_ATTEMPTS + 1):
            grounded, resized = self.grounding.for_images(conversation, images, self._image_size(scale, image_pixels))
            if grounded is not conversation:
                text = chat_text(self.processor, grounded, add_generation_prompt)[0]
            out = self._process(text, images, clips, scale, image_pixels)
            if grounded is not conversation:
                self.grounding.check_grid(resized, out["image_grid_thw"], conversation.origin)
            if scale == 1.0 and images:
                patch = self.processor.image_processor.patch_size
                image_pixels = int(out["image_grid_thw"][:, 1:].prod(-1).max()) * patch * patch
            length = out["input_ids"].shape[1]
            if self.model_max_length is None or length <= self.model_max_length:
                break
            visual = int((out["input_ids"] == self.tokens.image_pad).sum() + (out["input_ids"] == self.tokens.video_pad).sum())
            text_len = length - visual
            if visual == 0 or text_len >= self.model_max_length:
                raise SampleTooLong(
                    f"{conversation.origin}: {length} tokens ({text_len} of text) do not fit --model_max_length "
                    f"{self.model_max_length}; the text alone is too long, so the sample is dropped. Raise "
                    f"--model_max_length or shorten the sample.")
            # Visual tokens scale with pixels; aim for the room left by the text, with a margin.
            scale *= max(0.05, 0.9 * (self.model_max_length - text_len) / visual)
        else:
            raise SampleTooLong(
                f"{conversation.origin}: {length} tokens do not fit --model_max_length {self.model_max_length} "
                f"even at the lowest resolution --min_pixels allows; the sample is dropped. Raise "
                f"--model_max_length or lower --min_pixels.")
        return out

    def _finish(self, out, conversation: Conversation) -> dict:
        input_ids = out["input_ids"][0]
        labels = assistant_labels(input_ids, self.tokens)
        if not bool((labels != IGNORE_INDEX).any()):
            raise DataError(f"{conversation.origin}: no assistant reply left to train on (the conversation needs "
                            f"at least one assistant/gpt turn with text).")
        sample = {"input_ids": input_ids, "labels": labels}
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            if key in out and out[key] is not None:
                sample[key] = out[key]
        if "second_per_grid_ts" in out and out["second_per_grid_ts"] is not None:
            sample["second_per_grid_ts"] = torch.as_tensor(out["second_per_grid_ts"], dtype=torch.float32).reshape(-1)
        sample["position_ids"] = self.rope(
            input_ids, out["mm_token_type_ids"][0],
            image_grid_thw=sample.get("image_grid_thw"), video_grid_thw=sample.get("video_grid_thw"),
            second_per_grid_ts=sample.get("second_per_grid_ts"))
        return sample
