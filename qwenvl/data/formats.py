"""Raw annotation records -> ``Conversation`` (chat messages with typed content parts).

Accepted record formats:

* LLaVA: ``{"image": "a.jpg" | [...], "video": ..., "conversations": [{"from":
  "human"|"gpt"|"system", "value": "<image>\\nWhat is this?"}, ...]}``;
* messages: ``{"messages": [{"role": ..., "content": "text with <image>" | [parts]}],
  "images": [...], "videos": [...]}``, parts being ``{"type": "text", "text": ...}``,
  ``{"type": "image", "image": ref}`` or ``{"type": "video", "video": ref}``; a part
  without an inline ref takes the next item of ``images``/``videos``. HF rows such as
  trl-lib/llava-instruct-mix (``{"type": "image"}`` placeholders + PIL ``images``)
  are this format.

Output: ``[{"role": "system"|"user"|"assistant", "content": [{"type": "text",
"text": str} | {"type": "image", "image": ref} | {"type": "video", "video": ref}]}]``;
an assistant turn may also carry ``"reasoning_content": str`` (its reasoning, as the
thinking models' chat templates name it; see ``chat_pieces``).

``<image>``/``<video>`` tags become media parts where they appear; the text
around them is kept exactly, newlines included (the official code replaced the
tag with vision tokens and kept the rest of the string). The number of tags must
equal the number of media given: a mismatch is an error, never a guess.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from .errors import DataError, where
from .media import resolve_media
from .registry import DatasetSpec

__all__ = ["Conversation", "to_conversation", "to_conversations"]

_TAGS = re.compile(r"(<image>|<video>)")
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}
_ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    """Messages of one sample, and where it came from (for error messages and previews)."""

    messages: list[dict]
    origin: str
    # Assistant turns before this message index are context only, not trained (a part of a
    # record split per reasoning turn: chat_pieces.split_for_thinking).
    trained_from: int = 0


class _Media:
    """The record's images or videos, handed out in order; tracks how many were asked for."""

    def __init__(self, kind: str, items: list, spec: DatasetSpec, origin: str):
        self.kind, self.items, self.spec, self.origin = kind, items, spec, origin
        self.used = 0

    def take(self) -> Any:
        self.used += 1
        if self.used <= len(self.items):
            return resolve_media(self.items[self.used - 1], self.spec.data_path, self.origin)
        return None  # counted; reported by check()

    def check(self) -> str | None:
        if self.used == len(self.items):
            return None
        given = len(self.items)
        msg = (f"{self.used} {self.kind} placeholder(s) but {given} {self.kind}(s) given. Fix: "
               f"put one <{self.kind}> tag (or {{\"type\": \"{self.kind}\"}} part) per "
               f"{self.kind}, where it belongs in the text, or correct the list of {self.kind}s")
        if self.kind == "video" and self.used == 1 and given > 1:
            msg += ("; if these are the frames of one video, nest them: "
                    "\"video\": [[\"frame1.jpg\", \"frame2.jpg\", ...]]")
        return msg + "."


def _media_list(record: dict, singular: str, origin: str) -> list:
    """The record's media of one kind as a list, from ``image`` or ``images`` (not both)."""
    plural = singular + "s"
    if record.get(singular) is not None and record.get(plural) is not None:
        raise DataError(f"{origin}: both '{singular}' and '{plural}' are given. Fix: keep one.")
    value = record.get(singular, record.get(plural))
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _split_tags(text: str, media: dict[str, _Media]) -> list[dict]:
    parts = []
    for piece in _TAGS.split(text):
        if piece in ("<image>", "<video>"):
            kind = piece[1:-1]
            parts.append({"type": kind, kind: media[kind].take()})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _role(value: Any, allowed, field: str, turn: int, origin: str) -> str:
    if isinstance(value, str) and value in allowed:
        return allowed[value] if isinstance(allowed, dict) else value
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, list(allowed), n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
    raise DataError(f"{origin}, turn {turn}: unknown {field} {value!r}.{hint} Fix: use one of "
                    f"{', '.join(allowed)}.")


def _part(part: Any, media: dict[str, _Media], turn: int, origin: str) -> dict:
    """One explicit content part; an image/video part without a ref takes the next listed one."""
    if not isinstance(part, dict):
        raise DataError(f"{origin}, turn {turn}: a content part must be an object with a "
                        f"'type', got {part!r}.")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise DataError(f"{origin}, turn {turn}: a text part needs a string 'text', got "
                            f"{part.get('text')!r}.")
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":  # OpenAI style: {"type": "image_url", "image_url": {"url": ...}}
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        kind, part = "image", {"image": url}
    if kind in ("image", "video"):
        inline = part.get(kind)
        if inline is None:
            return {"type": kind, kind: media[kind].take()}
        return {"type": kind, kind: resolve_media(inline, media[kind].spec.data_path, origin)}
    raise DataError(f"{origin}, turn {turn}: unknown content part type {kind!r}. Fix: use "
                    "'text', 'image' or 'video'.")


def _turns(record: dict, key: str, origin: str) -> list:
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{origin}: '{key}' is empty or not a list. Fix: give at least a user "
                        "turn and an assistant turn, or drop the record.")
    return turns


def _with_reasoning(message: dict, turn: dict, j: int, origin: str) -> dict:
    """Keep an assistant turn's ``reasoning_content`` (the thinking models' field for reasoning)."""
    reasoning = turn.get("reasoning_content")
    if reasoning is None:
        return message
    if message["role"] != "assistant" or not isinstance(reasoning, str):
        raise DataError(f"{origin}, turn {j}: 'reasoning_content' must be a string on an assistant turn. Fix: "
                        "move it to the assistant turn whose reasoning it is, as text.")
    message["reasoning_content"] = reasoning
    return message


def _convert(record: Any, spec: DatasetSpec, origin: str) -> Conversation:
    if not isinstance(record, dict):
        raise DataError(f"{origin}: a record must be a JSON object, got {type(record).__name__}.")
    media = {k: _Media(k, _media_list(record, k, origin), spec, origin) for k in ("image", "video")}
    messages = []
    if "conversations" in record:
        for j, turn in enumerate(_turns(record, "conversations", origin)):
            if not isinstance(turn, dict):
                raise DataError(f"{origin}, turn {j}: expected {{\"from\": ..., \"value\": ...}}, "
                                f"got {turn!r}.")
            role = _role(turn.get("from"), _LLAVA_ROLES, "'from'", j, origin)
            value = turn.get("value")
            if not isinstance(value, str):
                raise DataError(f"{origin}, turn {j}: 'value' must be a string, got "
                                f"{type(value).__name__}. Fix: write the turn's text as a string.")
            messages.append(_with_reasoning({"role": role, "content": _split_tags(value, media)}, turn, j, origin))
    elif "messages" in record:
        for j, turn in enumerate(_turns(record, "messages", origin)):
            if not isinstance(turn, dict):
                raise DataError(f"{origin}, turn {j}: expected {{\"role\": ..., \"content\": "
                                f"...}}, got {turn!r}.")
            role = _role(turn.get("role"), _ROLES, "role", j, origin)
            content = turn.get("content")
            if isinstance(content, str):
                parts = _split_tags(content, media)
            elif isinstance(content, list):
                parts = [_part(p, media, j, origin) for p in content]
            else:
                raise DataError(f"{origin}, turn {j}: 'content' must be a string or a list of "
                                f"parts, got {type(content).__name__}.")
            messages.append(_with_reasoning({"role": role, "content": parts}, turn, j, origin))
    else:
        raise DataError(f"{origin}: no 'conversations' (LLaVA) or 'messages' key; found "
                        f"{sorted(record)}. Fix: use one of the two formats (see "
                        "qwenvl/data/formats.py).")
    problems = [p for p in (media["image"].check(), media["video"].check()) if p]
    if problems:
        raise DataError(f"{origin}: " + " Also: ".join(problems))
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{origin}: no assistant turn, so nothing to train on. Fix: add the "
                        "answer as an assistant ('gpt') turn, or drop the record.")
    return Conversation(messages=messages, origin=origin)


def to_conversation(record: dict, spec: DatasetSpec, index: int) -> Conversation:
    """Convert record ``index`` of dataset ``spec`` (LLaVA or messages format).

    Media refs are resolved against ``spec.data_path``. Raises DataError naming the
    dataset, file and record for unknown roles, missing assistant turns, empty
    conversations, non-string text and placeholder/media count mismatches.
    """
    return _convert(record, spec, where(spec.name, spec.annotation_path, index))


def to_conversations(packed_record: list, spec: DatasetSpec, index: int) -> list[Conversation]:
    """Convert a packed record (a list of samples) into one Conversation per sample."""
    if not isinstance(packed_record, list) or not packed_record:
        raise DataError(f"{where(spec.name, spec.annotation_path, index)}: a packed record must "
                        "be a non-empty list of samples.")
    return [_convert(sample, spec, where(spec.name, spec.annotation_path, f"{index}, sample {k}"))
            for k, sample in enumerate(packed_record)]
