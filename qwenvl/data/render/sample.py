"""One conversation -> the tensors the model trains on, for every family and batching mode.

The conversation is written as chat pieces (``chat_pieces``), each marked trained or
not where it is written, then tokenized piece-aware (``piece_tokens``): labels are
built while rendering, never read off the tokens afterwards.  For every record
whose text holds no special-token text, ``input_ids`` are exactly what
``processor.apply_chat_template(messages, tokenize=True)`` gives at inference (the
pieces' text is checked against the template for every sample); special-token text
typed in a record (``<|im_end|>``, ``<|im_start|>assistant``, ``<|image_pad|>``) is
tokenized as text, so it can neither open a trained span nor eat an image.  The
processor does the pixels and the placeholder expansion (its own
``replace_image_token`` / ``replace_video_token``).  No token id is written here.

Example (Qwen2.5-VL, one image)::

    text:   <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
            <|im_start|>user\\n<|vision_start|><|image_pad|>x16<|vision_end|>What colour?<|im_end|>\\n
            <|im_start|>assistant\\nred<|im_end|>\\n
    labels: -100 everywhere except  "red" and "<|im_end|>"

Qwen3.5/3.6 thinking (``thinking``, the value of ``--enable_thinking``: "auto", "true", "false", which a
dataset's ``enable_thinking`` in the dictionary overrides for its records; the rule is in ``chat_pieces``):
an answer without reasoning trains in non-thinking mode (the empty think block is
prompt); one with reasoning trains its think block.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from jinja2 import TemplateError

from qwenvl.data.catalog.formats import Conversation
from qwenvl.data.errors import DataError, DataKind
from qwenvl.data.media.read import DEFAULT_MEDIA_TIMEOUT_S, open_image
from qwenvl.data.media.video import load_video, processor_video_inputs, processor_videos_kwargs, resize_clip
from qwenvl.data.render import IGNORE_INDEX
from qwenvl.data.render.chat_pieces import (THINKING_MODES, ChatRules, conversation_pieces, pieces_text,
                                            reasoning_and_answer, split_for_thinking, template_view)
from qwenvl.data.render.fit import Measured, fit_to_context
from qwenvl.data.render.grounding import Grounding
from qwenvl.data.render.piece_tokens import PieceTokenizer, expand_media
from qwenvl.data.render.prompt import (last_reply_index, raise_if_template_failure, refuse_tools_unless_rendered,
                                       template_messages)
from qwenvl.data.render.rope import RopeIndex



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


class SampleRenderer:
    """Render conversations into model inputs with a family's processor.

    ``render(conversation)`` returns a dict of tensors for one sample:
    ``input_ids`` (L,), ``labels`` (L,), ``position_ids`` (3, L) and, when the
    sample has them, ``pixel_values`` + ``image_grid_thw`` and
    ``pixel_values_videos`` + ``video_grid_thw`` (+ ``second_per_grid_ts`` on
    Qwen2.5-VL).  The collators only stack or concatenate these.
    """

    def __init__(self, processor, model_config, model_max_length: int | None = None, video_settings=None,
                 thinking: str = "auto"):
        if thinking not in THINKING_MODES:
            raise ValueError(f"thinking must be one of {', '.join(THINKING_MODES)}, not {thinking!r}")
        self.processor = processor
        self.tokens = SpecialTokens.from_tokenizer(processor.tokenizer)
        self.rope = RopeIndex(model_config)
        self.model_max_length = model_max_length
        self.video_settings = video_settings
        # Boxes and points are rewritten into the family's coordinates for each image as resized.
        self.grounding = Grounding(getattr(model_config, "model_type", None), processor.image_processor)
        self.thinking = thinking
        self.chat = ChatRender(processor, thinking)

    def reply_thinking(self, conversation: Conversation) -> str:
        """The thinking mode the last trained assistant turn of ``conversation`` (the reply evaluation asks
        for: ``prompt.split_last_reply``) trains in ("true"/"false"), so a generation prompt for it is the
        training prefix; the renderer's mode elsewhere."""
        rules = self.chat.rules
        mode = self.chat.mode(conversation)
        if not rules.think_blocks or mode != "auto":
            return mode
        last = last_reply_index(conversation)
        if last is None:
            return mode
        reasoning, _ = reasoning_and_answer(conversation.messages[last], rules, conversation.origin)
        return "true" if reasoning and reasoning.strip() else "false"

    # -- media -----------------------------------------------------------------------
    def _load_videos(self, refs: list, origin: str) -> list:
        return [load_video(ref, self.video_settings, origin=origin) for ref in refs]

    def _video_inputs(self, clips: list, scale: float):
        """Frames and metadata for the processor; ``scale`` < 1 refits frames to fewer pixels.

        Frames are sized here, per frame, and the processor is told not to resize them
        again: Qwen3-VL's video processor reads its pixel bounds as a budget for the
        whole video, so resizing there would change the meaning of --video_max_pixels.
        """
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
        kwargs = {"return_metadata": True}  # Qwen3-VL's video replacement needs the frames' metadata
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
        if not kwargs.get("images") and not kwargs.get("videos"):
            return {}
        return self.processor(text=None, return_tensors="pt", **kwargs)

    def render(self, conversation: Conversation) -> dict:
        """Tensors for one conversation (see the class docstring); raises DataError on bad input.

        A Qwen3.5 record with reasoning in turns before its last query trains as one sample
        per reasoning turn (``chat_pieces.split_for_thinking``): then the result is
        ``{"pack": [sample, ...]}``, which the collators take like a packed record.
        """
        parts = self.chat.split(conversation)
        if len(parts) > 1:
            return {"pack": [self._finish(self.encode(part), part) for part in parts]}
        # One part: the conversation itself, or a prefix of it when the turns after its last reasoning
        # turn are all untrained (split_for_thinking leaves out a part that would train nothing).
        return self._finish(self.encode(parts[0]), parts[0])

    def encode(self, conversation: Conversation, add_generation_prompt: bool = False, thinking: str | None = None):
        """Model inputs for ``conversation``, media shrunk to fit if needed: ``input_ids`` (1, L),
        ``labels`` (1, L), ``mm_token_type_ids`` (1, L) and the processor's pixels and grids.

        ``add_generation_prompt=True`` is the prompt a generation continues from (the chat
        and evaluation tools): the same pieces, media and processor call as training, plus
        the assistant header of the ``thinking`` mode (default: the renderer's), so its ids
        are a prefix of the trained sample's ids.
        """
        pieces = self.chat.pieces(conversation, add_generation_prompt, thinking)
        _, image_refs, video_refs = template_messages(conversation)
        timeout_s = getattr(self.video_settings, "timeout_s", DEFAULT_MEDIA_TIMEOUT_S)  # --media_timeout
        images = [open_image(ref, origin=conversation.origin, timeout_s=timeout_s) for ref in image_refs]
        clips = self._load_videos(video_refs, conversation.origin) if video_refs else []

        image_pixels = 0  # the largest image's pixels at full resolution (the first measurement)

        def measure(scale: float) -> Measured:
            nonlocal image_pixels
            # Boxes and points follow each image as resized at this scale: the pieces are rebuilt from
            # the grounded conversation (same turns and trained spans, rewritten coordinates).
            grounded, resized = self.grounding.for_images(conversation, images, self._image_size(scale, image_pixels))
            scale_pieces = pieces if grounded is conversation else self.chat.pieces(
                grounded, add_generation_prompt, thinking)
            out = dict(self._process("", images, clips, scale, image_pixels))
            if grounded is not conversation:
                self.grounding.check_grid(resized, out["image_grid_thw"], conversation.origin)
            if scale == 1.0 and images:
                patch = self.processor.image_processor.patch_size
                image_pixels = int(out["image_grid_thw"][:, 1:].prod(-1).max()) * patch * patch
            ids, trained = self.chat.tokens(scale_pieces, *self.chat.replacements(out, len(images), len(clips)))
            visual = sum(1 for i in ids if i == self.tokens.image_pad or i == self.tokens.video_pad)
            return Measured(len(ids), visual, (out, ids, trained))

        (out, ids, trained), _scale = fit_to_context(measure, self.model_max_length, conversation.origin)
        out.pop("video_metadata", None)
        input_ids = torch.tensor([ids], dtype=torch.long)
        out["input_ids"] = input_ids
        out["attention_mask"] = torch.ones_like(input_ids)
        out["labels"] = torch.where(torch.tensor([trained]), input_ids, IGNORE_INDEX)
        out["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids([ids]), dtype=torch.long)
        return out

    def _finish(self, out, conversation: Conversation) -> dict:
        input_ids = out["input_ids"][0]
        labels = out["labels"][0]
        if not bool((labels != IGNORE_INDEX).any()):
            raise DataError(f"{conversation.origin}: no assistant reply left to train on (the conversation needs "
                            f"at least one assistant/gpt turn with text).", DataKind.NO_ASSISTANT)
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


class ChatRender:
    """A family's chat rendering for one processor: conversation -> pieces -> ids and trained flags.

    Shared by ``SampleRenderer`` (pixels from the processor) and ``lengths.TokenCounter``
    (grids counted from media sizes), so the two cannot tokenize differently.
    """

    def __init__(self, processor, thinking: str = "auto"):
        self.processor = processor
        self.thinking = thinking
        self.rules = ChatRules.of(processor)
        self.tokenizer = PieceTokenizer(processor.tokenizer)

    def mode(self, conversation: Conversation, thinking: str | None = None) -> str:
        """The thinking mode ``conversation`` renders in: ``thinking`` when given (a generation prompt's),
        else its dataset's ``enable_thinking`` (``conversation.thinking``), else ``--enable_thinking``."""
        return thinking or conversation.thinking or self.thinking

    def split(self, conversation: Conversation) -> list[Conversation]:
        """The samples ``conversation`` trains as (one, or one per reasoning turn on Qwen3.5)."""
        return split_for_thinking(conversation, self.rules, self.mode(conversation))

    def pieces(self, conversation: Conversation, add_generation_prompt: bool = False, thinking: str | None = None):
        """The pieces of ``conversation``, checked to join to exactly what the chat template renders."""
        thinking = self.mode(conversation, thinking)
        refuse_tools_unless_rendered(self.processor, conversation)
        try:
            pieces, kwargs = conversation_pieces(conversation, self.rules, thinking, add_generation_prompt,
                                                 render=self._render)
            expected = self.processor.apply_chat_template(
                template_view(conversation, self.rules, thinking), tokenize=False,
                add_generation_prompt=add_generation_prompt, **kwargs)
        except (TypeError, TemplateError) as exc:  # the template's own refusal, or data it cannot iterate
            raise_if_template_failure(conversation, exc)
            raise
        if pieces_text(pieces) != expected:
            raise DataError(
                f"{conversation.origin}: the renderer's pieces differ from what the processor's chat template "
                f"renders, so its labels cannot be trusted. Rendered by the template:\n{expected!r}\nby the "
                f"pieces:\n{pieces_text(pieces)!r}\nFix: use the family's released chat template (a custom "
                f"template needs a rule in qwenvl/data/render/chat_pieces.py).")
        return pieces

    def _render(self, messages: list[dict], **kwargs) -> str:
        """The processor's chat template as text (probes for the template-written tool text)."""
        return self.processor.apply_chat_template(messages, tokenize=False, **kwargs)

    def replacements(self, processed: dict, images: int, videos: int) -> tuple[list[str], list[str]]:
        """The processor's own placeholder expansions for the processed (or counted) media."""
        return ([self.processor.replace_image_token(processed, image_idx=i) for i in range(images)],
                [self.processor.replace_video_token(processed, video_idx=i) for i in range(videos)])

    def tokens(self, pieces, image_replacements: list[str], video_replacements: list[str]):
        """(ids, trained flags) of ``pieces`` with the media expanded."""
        expanded = expand_media(pieces, image_replacements, video_replacements,
                                self.processor.image_token, self.processor.video_token)
        return self.tokenizer.encode(expanded)
