"""Raw annotation records -> ``Conversation`` (chat messages with typed content parts).

Accepted record layouts (the first key found decides):

* LLaVA / LLaMA-Factory sharegpt: ``{"image": "a.jpg" | [...], "video": ..., "system":
  "...", "tools": "[...]", "conversations": [{"from": "human"|"gpt"|"system"|
  "function_call"|"observation", "value": "<image>\\nWhat is this?"}, ...]}``.
  ``system`` (optional) is the system prompt.  ``tools`` (a JSON string or a list of
  function descriptions), ``function_call`` turns (a JSON ``{"name", "arguments"}`` or a
  list of them: the assistant's tool calls, trained) and ``observation`` turns (tool
  results, not trained) go through the family's chat template as tools, tool calls and
  tool responses; a template that does not render tools refuses them (see ``prompt``).
* messages (TRL conversational): ``{"messages": [{"role": ..., "content": "text with
  <image>" | [parts]}], "images": [...], "videos": [...], "tools": [...]}``, parts being
  ``{"type": "text", "text": ...}``, ``{"type": "image", "image": ref}`` or ``{"type":
  "video", "video": ref}``; a part without an inline ref takes the next item of
  ``images``/``videos``.  Roles: system, user, assistant (with optional ``tool_calls``),
  tool.  HF rows such as trl-lib/llava-instruct-mix (``{"type": "image"}`` placeholders +
  PIL ``images``) are this layout, and so is ``conversations`` whose turns all have ``role`` and
  no ``from`` (HF datasets and LLaMA-Factory sharegpt with ``role``/``content`` tags).
* prompt-completion (TRL): ``{"prompt": [messages], "completion": [assistant
  message(s)], "images": [...]}`` is ``prompt + completion`` in the messages layout, only the
  completion trained (``Conversation.trained_from``); the standard form ``{"prompt":
  "text", "completion": "text"}`` as one user and one assistant turn.

Per-turn training switches (messages and sharegpt turns, JSON and HF datasets alike): an
assistant turn with OpenAI's fine-tuning ``"weight": 0`` or ms-swift's ``"loss": false`` is
rendered as usual but not trained (context, like the assistant turns of a prompt-completion
``prompt``); ``1`` / ``true`` or no key (null included) trains it.  Any other value is refused,
and so is a turn that asks to train what is never trained (``true`` on a user, system or tool
turn, or on an assistant turn inside ``prompt``), and ms-swift's per-turn ``"loss_scale"`` other
than 1 (it would be trained at full weight).  A record whose every assistant turn is
switched off has nothing to train: ``no_assistant``, like a record without an answer.

Output: ``[{"role": "system"|"user"|"assistant"|"tool", "content": [{"type": "text",
"text": str} | {"type": "image", "image": ref} | {"type": "video", "video": ref}],
("tool_calls": [...])}]`` and the tools, if any; an assistant turn may also carry
``"reasoning_content": str`` (its reasoning, as the thinking models' chat templates
name it; see ``chat_pieces``) and ``"trained": False`` (switched off; ``Conversation.trains``).

``<image>``/``<video>`` tags become media parts where they appear; the text
around them is kept exactly, newlines included (the official code replaced the
tag with vision tokens and kept the rest of the string). The number of tags must
equal the number of media given: a mismatch is an error, never a guess.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image

from qwenvl.data.catalog.registry import BBOX_FORMATS, DatasetSpec, thinking_value
from qwenvl.data.errors import DataError, DataKind, where
from qwenvl.data.media.read import resolve_media

__all__ = ["Conversation", "record_layout", "to_conversation", "to_conversations"]

# The media tags of annotation text (LLaVA style): where each image / video of the record goes.
MEDIA_TAGS = re.compile(r"(<image>|<video>)")
_ANY_CASE_TAG = re.compile(r"<(?:image|video)>", re.IGNORECASE)
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system", "function_call": "assistant", "observation": "tool"}
_ROLES = ("system", "user", "assistant", "tool")
_LAYOUT_KEYS = {"conversations": "LLaVA / sharegpt", "messages": "messages", "prompt": "prompt-completion"}


@dataclass
class Conversation:
    """Messages of one sample, and where it came from (for error messages and previews)."""

    messages: list[dict]
    origin: str
    bbox_format: str | None = None  # the dataset's declared box/point coordinates (qwenvl/data/render/grounding.py)
    tools: list[dict] | None = None  # function descriptions the chat template renders (``tools=``)
    # The dataset's Qwen3.5/3.6 thinking mode ("auto", "true", "false": its "enable_thinking" in the
    # dictionary); None follows the renderer's --enable_thinking.
    thinking: str | None = None

    @property
    def uses_tools(self) -> bool:
        """True when rendering needs a template that knows tools, tool calls and tool responses."""
        return bool(self.tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in self.messages)
    # Assistant turns before this message index are context only, not trained (a part of a
    # record split per reasoning turn: chat_pieces.split_for_thinking).
    trained_from: int = 0

    def trains(self, i: int) -> bool:
        """True when message ``i`` is an assistant turn whose tokens are trained: at or after
        ``trained_from`` and not switched off by the record (``"weight": 0`` / ``"loss": false``)."""
        message = self.messages[i]
        return message["role"] == "assistant" and i >= self.trained_from and message.get("trained", True)


class _Media:
    """The record's images or videos, handed out in order; tracks how many were asked for."""

    def __init__(self, kind: str, items: list, spec: DatasetSpec, origin: str):
        self.kind, self.items, self.spec, self.origin = kind, items, spec, origin
        self.used = 0

    def take(self) -> Any:
        self.used += 1
        if self.used <= len(self.items):
            return _resolved(self.kind, self.items[self.used - 1], self.spec.data_path, self.origin)
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


def _resolved(kind: str, ref: Any, data_path: str, origin: str) -> Any:
    """``resolve_media`` of one image or video ref: an image is one image (not a list), a video is never an
    in-memory image."""
    resolved = resolve_media(ref, data_path, origin)
    if kind == "image" and isinstance(resolved, list):
        raise DataError(f"{origin}: an image is given as a list {str(ref)[:120]}; each image is one path or URL "
                        "(a nested list is how the frames of one video are written). Fix: list the images "
                        "themselves, \"image\": [\"a.jpg\", \"b.jpg\"], or move frames to 'video'.")
    frames = resolved if isinstance(resolved, list) else [resolved]
    if kind == "video" and any(isinstance(f, Image.Image) for f in frames):
        # Image bytes in the record (a data: URL, an HF {"bytes": ...} value): the video readers take
        # files and URLs only, and failed on it with a TypeError (a crash, not a bad sample).
        raise DataError(f"{origin}: a video is given as image bytes inside the record (a data: URL or "
                        "{\"bytes\": ...}); a video must be a file or URL, or a list of frame image files. Fix: "
                        "save the video (or its frames) to files and name them, or give a single image as an "
                        "image.", DataKind.BAD_VIDEO)
    return resolved


def _media_list(record: dict, singular: str, origin: str) -> list:
    """The record's media of one kind as a list, from ``image`` or ``images`` (not both)."""
    plural = singular + "s"
    if record.get(singular) is not None and record.get(plural) is not None:
        raise DataError(f"{origin}: both '{singular}' and '{plural}' are given. Fix: keep one.")
    # A null key counts as absent: Hugging Face datasets merged from two layouts carry both columns,
    # one of them null in every row (``record.get(singular, ...)`` returned that null and dropped the other).
    value = record.get(singular)
    if value is None:
        value = record.get(plural)
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _split_tags(text: str, media: dict[str, _Media]) -> list[dict]:
    parts = []
    for piece in MEDIA_TAGS.split(text):
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
        return {"type": kind, kind: _resolved(kind, inline, media[kind].spec.data_path, origin)}
    raise DataError(f"{origin}, turn {turn}: unknown content part type {kind!r}. Fix: use "
                    "'text', 'image' or 'video'.")


def _turns(record: dict, key: str, origin: str) -> list:
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{origin}: '{key}' is empty or not a list. Fix: give at least a user "
                        "turn and an assistant turn, or drop the record.")
    return turns


# Where datasets put an assistant turn's reasoning: ``reasoning_content`` (the Qwen templates' name), TRL's
# ``thinking`` (its gpt-oss datasets), ``reasoning`` (vLLM / OpenRouter responses). Ignoring the others
# trained such records in non-thinking mode with their reasoning silently dropped.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _with_reasoning(message: dict, turn: dict, j: int, origin: str) -> dict:
    """Keep an assistant turn's reasoning (any of ``_REASONING_KEYS``) as ``reasoning_content``."""
    given = [key for key in _REASONING_KEYS if turn.get(key) is not None]
    if not given:
        return message
    if len(given) > 1:
        raise DataError(f"{origin}, turn {j}: reasoning given twice, as '{given[0]}' and '{given[1]}'. Fix: "
                        "keep one.")
    reasoning = turn[given[0]]
    if message["role"] != "assistant" or not isinstance(reasoning, str):
        raise DataError(f"{origin}, turn {j}: '{given[0]}' must be a string on an assistant turn. Fix: "
                        "move it to the assistant turn whose reasoning it is, as text.")
    message["reasoning_content"] = reasoning
    return message


# Per-turn training switches: OpenAI's fine-tuning format writes "weight": 0 or 1 on assistant messages,
# ms-swift "loss": false or true (its docs: the key takes priority over --loss_scale's base strategy).
_SWITCH_KEYS = {"weight": "OpenAI's fine-tuning format: 0 or 1", "loss": "ms-swift: false or true"}


def _switch(turn: dict, role: str, j: int, origin: str, in_prompt: bool = False) -> bool | None:
    """The turn's training switch: True (train it), False (leave it untrained) or None (not given).

    0/1 and false/true are taken under either key (a JSON ``1.0`` is 1); anything else (a string
    ``"false"``, which is truthy, or a weight like 0.5, which would need a loss scale) is refused,
    as is asking to train a turn that is never trained.
    """
    scale = turn.get("loss_scale")
    if scale is not None and (isinstance(scale, bool) or scale != 1):
        # ms-swift (>= 4.2) scales a turn's loss by it; ignoring it would train the turn at full weight.
        raise DataError(f"{origin}, turn {j}: 'loss_scale': {scale!r}; per-turn loss scales are not supported, so "
                        "the turn would be trained at full weight. Fix: drop 'loss_scale' (write 'loss': false to "
                        "leave the turn untrained, true or nothing to train it).")
    given = [key for key in _SWITCH_KEYS if turn.get(key) is not None]  # null: absent (HF datasets fill it)
    if not given:
        return None
    if len(given) > 1:
        raise DataError(f"{origin}, turn {j}: both 'weight' and 'loss' are given. Fix: keep one ('weight': 0/1, "
                        "OpenAI's format, or 'loss': false/true, ms-swift's).")
    key = given[0]
    value = turn[key]
    if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
        trained = bool(value)
    else:
        raise DataError(f"{origin}, turn {j}: '{key}': {value!r} is not a training switch ({_SWITCH_KEYS[key]}). "
                        f"Fix: write '{key}': {'1' if key == 'weight' else 'true'} to train the assistant turn or "
                        f"{'0' if key == 'weight' else 'false'} to keep it as untrained context (a JSON number or "
                        "boolean, not a string); per-turn loss weights other than 0 and 1 are not supported.")
    if trained and role != "assistant":
        raise DataError(f"{origin}, turn {j}: '{key}': {value!r} asks to train a {role} turn; only assistant turns "
                        f"are trained. Fix: drop '{key}' from this turn.")
    if trained and in_prompt:
        raise DataError(f"{origin}, turn {j}: '{key}': {value!r} asks to train an assistant turn inside 'prompt', "
                        "whose turns are context only (TRL's prompt-completion layout). Fix: move the turn into "
                        f"'completion', or write the record as 'messages' with '{key}' on each assistant turn.")
    return trained


def _with_switch(message: dict, turn: dict, j: int, origin: str, in_prompt: bool = False) -> dict:
    """``message`` marked ``"trained": False`` when the record switches its training off (``_switch``)."""
    if _switch(turn, message["role"], j, origin, in_prompt) is False and message["role"] == "assistant":
        message["trained"] = False
    return message


def record_layout(record: Any) -> str | None:
    """The layout of a raw record (``"LLaVA / sharegpt"``, ``"messages"``, ``"prompt-completion"``), or None."""
    if isinstance(record, dict):
        for key, name in _LAYOUT_KEYS.items():
            if record.get(key) is not None:
                return name
    return None


def _json_list(value: Any, what: str, fix: str) -> Any:
    """``value`` (JSON text or already data) as data, one object wrapped in a list.

    LLaMA-Factory's sharegpt stores ``tools`` and ``function_call`` values as JSON strings;
    other layouts store the objects themselves. Invalid JSON is refused naming ``what`` and the fix.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"{what} is not valid JSON ({exc}). Fix: write {fix}.") from None
    return [value] if isinstance(value, dict) else value


def _tools(value: Any, origin: str) -> list[dict] | None:
    """A record's ``tools`` as the chat templates take them: ``{"type": "function", "function": {...}}``.

    LLaMA-Factory stores a JSON string of bare function descriptions; they are wrapped as
    transformers (``get_json_schema``) and LLaMA-Factory's Qwen formatter wrap them.
    """
    if value is None or value == "" or value == []:
        return None
    value = _json_list(value, f"{origin}: 'tools'", "a JSON list of function descriptions "
                       "({\"name\", \"description\", \"parameters\"})")
    if not isinstance(value, list) or not all(isinstance(t, dict) and (t.get("name") or t.get("function"))
                                              for t in value):
        raise DataError(f"{origin}: 'tools' must be a list of function descriptions, each with a 'name' "
                        f"(or a 'function' holding one), got {str(value)[:120]!r}.")
    return [t if "type" in t else {"type": "function", "function": t} for t in value]


def _tool_calls(value: Any, turn: int, origin: str) -> list[dict]:
    """A ``function_call`` turn's value (JSON ``{"name", "arguments"}`` or a list) -> ``tool_calls``."""
    calls = _json_list(value, f"{origin}, turn {turn}: the function_call value",
                       "{\"name\": ..., \"arguments\": {...}} (or a list of them)")
    out = []
    for call in calls if isinstance(calls, list) else [None]:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(f"{origin}, turn {turn}: a function call needs a 'name' and 'arguments', got "
                            f"{str(value)[:120]!r}. Fix: write {{\"name\": ..., \"arguments\": {{...}}}}.")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:  # the templates write a dict with tojson and a string as it is; keep JSON as data
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        out.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out


def _message_turns(turns: list, key: str, media: dict[str, _Media], origin: str, offset: int = 0) -> list[dict]:
    """Messages-layout turns (``{"role", "content"[, "tool_calls"]}``) -> normalised messages."""
    messages = []
    for j, turn in enumerate(turns, start=offset):
        if not isinstance(turn, dict):
            raise DataError(f"{origin}, turn {j}: expected {{\"role\": ..., \"content\": "
                            f"...}} in '{key}', got {turn!r}.")
        role = _role(turn.get("role"), _ROLES, "role", j, origin)
        content = turn.get("content")
        calls = turn.get("tool_calls")
        if isinstance(content, str):
            parts = _split_tags(content, media)
        elif isinstance(content, list):
            parts = [_part(p, media, j, origin) for p in content]
        elif content is None and calls:
            parts = []
        else:
            raise DataError(f"{origin}, turn {j}: 'content' must be a string or a list of "
                            f"parts, got {type(content).__name__}.")
        message = _with_reasoning({"role": role, "content": parts}, turn, j, origin)
        message = _with_switch(message, turn, j, origin, in_prompt=key == "prompt")
        if calls:
            if role != "assistant":
                raise DataError(f"{origin}, turn {j}: only an assistant turn can carry 'tool_calls' (role {role!r}).")
            message["tool_calls"] = _tool_calls(calls, j, origin)
        messages.append(message)
    return messages


def _role_content_turns(turns: Any) -> bool:
    """True when every turn is ``{"role", "content"}`` and none has sharegpt's ``from``."""
    return (isinstance(turns, list) and bool(turns)
            and all(isinstance(t, dict) and "role" in t and "from" not in t for t in turns))


def _sharegpt_turns(record: dict, media: dict[str, _Media], origin: str) -> list[dict]:
    messages = []
    for j, turn in enumerate(_turns(record, "conversations", origin)):
        if not isinstance(turn, dict):
            raise DataError(f"{origin}, turn {j}: expected {{\"from\": ..., \"value\": ...}}, "
                            f"got {turn!r}.")
        speaker = turn.get("from")
        role = _role(speaker, _LLAVA_ROLES, "'from'", j, origin)
        value = turn.get("value")
        if not isinstance(value, str):
            raise DataError(f"{origin}, turn {j}: 'value' must be a string, got "
                            f"{type(value).__name__}. Fix: write the turn's text as a string.")
        if speaker == "function_call":
            message = {"role": "assistant", "content": [], "tool_calls": _tool_calls(value, j, origin)}
        else:
            message = _with_reasoning({"role": role, "content": _split_tags(value, media)}, turn, j, origin)
        messages.append(_with_switch(message, turn, j, origin))
    return messages


def _prompt_completion(record: dict, media: dict[str, _Media], origin: str) -> tuple[list[dict], int]:
    """(messages of ``prompt + completion``, index of the first completion message)."""
    prompt, completion = record.get("prompt"), record.get("completion")
    if completion is None:
        raise DataError(f"{origin}: a 'prompt' without a 'completion'. Fix: add the answer as 'completion' "
                        "(TRL's prompt-completion layout), or use 'messages'.")
    if isinstance(prompt, str) and isinstance(completion, str):  # TRL's standard (not conversational) form
        return [{"role": "user", "content": _split_tags(prompt, media)},
                {"role": "assistant", "content": _split_tags(completion, media)}], 1
    if isinstance(completion, dict):
        completion = [completion]
    if not isinstance(prompt, list) or not prompt or not isinstance(completion, list) or not completion:
        raise DataError(f"{origin}: 'prompt' and 'completion' must both be lists of messages (TRL's "
                        f"conversational layout) or both strings, got {type(prompt).__name__} and "
                        f"{type(completion).__name__}.")
    messages = _message_turns(prompt, "prompt", media, origin)
    answers = _message_turns(completion, "completion", media, origin, offset=len(prompt))
    if any(m["role"] not in ("assistant", "tool") for m in answers):
        raise DataError(f"{origin}: 'completion' holds a {answers[0]['role']!r} turn; it must be the "
                        "assistant's reply. Fix: move other turns into 'prompt'.")
    return messages + answers, len(messages)


def _convert(record: Any, spec: DatasetSpec, origin: str) -> Conversation:
    if not isinstance(record, dict):
        raise DataError(f"{origin}: a record must be a JSON object, got {type(record).__name__}.",
                        DataKind.INVALID_JSON)
    media = {k: _Media(k, _media_list(record, k, origin), spec, origin) for k in ("image", "video")}
    layout = record_layout(record)
    trained_from = 0  # assistant turns before this index are context only (prompt-completion)
    if layout == "LLaVA / sharegpt" and _role_content_turns(record["conversations"]):
        # ``conversations`` written with messages-style turns (many Hugging Face datasets; LLaMA-Factory's
        # sharegpt with role_tag/content_tag "role"/"content"): read them as messages.
        messages = _message_turns(record["conversations"], "conversations", media, origin)
    elif layout == "LLaVA / sharegpt":
        messages = _sharegpt_turns(record, media, origin)
    elif layout == "messages":
        messages = _message_turns(_turns(record, "messages", origin), "messages", media, origin)
    elif layout == "prompt-completion":
        # TRL trains the completion only: assistant turns inside the prompt are context, never trained.
        messages, trained_from = _prompt_completion(record, media, origin)
    elif any(key in record for key in _LAYOUT_KEYS):
        # The key is there but null: a Hugging Face dataset fills the column a row lacks with null.
        nulls = [key for key in _LAYOUT_KEYS if key in record]
        raise DataError(f"{origin}: {' and '.join(repr(k) for k in nulls)} "
                        f"{'is' if len(nulls) == 1 else 'are'} null, so the record has no turns. Fix: fill in "
                        "the record's turns, or drop the record (a Hugging Face dataset gives null for a column "
                        "that a row lacks).")
    else:
        raise DataError(f"{origin}: no 'conversations' (LLaVA / sharegpt), 'messages' or 'prompt' + "
                        f"'completion' (TRL) key; found {sorted(record)}. Fix: use one of these layouts "
                        "(README, Annotation formats).")
    system = record.get("system")
    if system is not None and system != "":
        if not isinstance(system, str):
            raise DataError(f"{origin}: 'system' must be a string, got {type(system).__name__}.")
        if messages[0]["role"] == "system":
            raise DataError(f"{origin}: both a top-level 'system' and a system turn. Fix: keep one.")
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        if trained_from:  # the system turn inserted first shifts the completion's index by one
            trained_from += 1
    problems = [p for p in (media["image"].check(), media["video"].check()) if p]
    if problems:
        miscased = [tag for m in messages for part in m["content"] if part["type"] == "text"
                    for tag in _ANY_CASE_TAG.findall(part["text"]) if tag not in ("<image>", "<video>")]
        if miscased:  # "<Image>" is text, not a tag: say so rather than only count the tags
            problems.append(f"The text holds {miscased[0]}; tags are lower case: <image>, <video>.")
        raise DataError(f"{origin}: " + " Also: ".join(problems), DataKind.TAG_MISMATCH)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{origin}: no assistant turn, so nothing to train on. Fix: add the "
                        "answer as an assistant ('gpt') turn, or drop the record.", DataKind.NO_ASSISTANT)
    trainable = range(trained_from, len(messages))
    if not any(messages[i]["role"] == "assistant" and messages[i].get("trained", True) for i in trainable):
        # Every answer switched off ("weight": 0 / "loss": false): no trained token, the same bad record as
        # one without an answer (skipped or stopped on by --bad_sample_policy), named here with its cause.
        raise DataError(f"{origin}: every assistant turn is marked untrained ('weight': 0 or 'loss': false), so "
                        "nothing is trained on. Fix: set 'weight': 1 / 'loss': true (or drop the key) on the "
                        "answers to learn, or drop the record.", DataKind.NO_ASSISTANT)
    # A record's own "bbox_format" (packed files from pack_data carry one) wins over its dataset's.
    bbox_format = record.get("bbox_format", getattr(spec, "bbox_format", None))
    if bbox_format is not None and bbox_format not in BBOX_FORMATS:
        raise DataError(f"{origin}: 'bbox_format' must be one of {', '.join(BBOX_FORMATS)}, got {bbox_format!r}.")
    # Likewise its own "enable_thinking" (pack_data writes the dataset's into each record of a packed file).
    thinking = record.get("enable_thinking", getattr(spec, "enable_thinking", None))
    if thinking is not None and thinking_value(thinking) is None:
        raise DataError(f"{origin}: 'enable_thinking' must be true, false or \"auto\", got {thinking!r}.")
    return Conversation(messages=messages, origin=origin, tools=_tools(record.get("tools"), origin),
                        bbox_format=bbox_format, thinking=thinking_value(thinking) if thinking is not None else None,
                        trained_from=trained_from)


def to_conversation(record: dict, spec: DatasetSpec, index: int) -> Conversation:
    """Convert record ``index`` of dataset ``spec`` (any layout of the module docstring).

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
