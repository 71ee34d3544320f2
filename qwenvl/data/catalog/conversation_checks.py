"""Checks of a converted conversation for what trains silently wrong, shared by training and the audit.

``conversation_of`` reads, converts and checks one record: the one path from an annotation record
to a checked ``Conversation`` for training, the length cache and the audit.

Errors (``DataError``, handled by ``--bad_sample_policy``):

* ``media_in_answer``: an image or video inside an assistant turn; its placeholder
  tokens would land in the labels and the model would be trained to emit them;
* ``empty_answer``: a trained assistant turn with no text, no media and no tool calls; only ``<|im_end|>``
  would be trained, teaching the model to answer nothing;
* ``special_token_text``: the text ``<|image_pad|>`` or ``<|video_pad|>`` in a turn; the
  processor expands these strings as media placeholders, so the record either fails
  in the processor or trains placeholders without pixels.

Warnings (``DataWarning``: logged by training, reported by the audit, never fatal):

* ``starts_with_assistant``: the first turn after the system prompt is the assistant's
  (it answers no question);
* ``ends_with_user``: the last turn is the user's (a question with no answer, not trained).
"""
from __future__ import annotations

import logging

from qwenvl.data.catalog.formats import Conversation, to_conversation, to_conversations
from qwenvl.data.catalog.registry import DatasetSpec
from qwenvl.data.errors import DataError, DataKind, DataWarning

logger = logging.getLogger(__name__)

__all__ = ["conversation_of", "check_conversation", "conversation_warnings", "log_warnings", "PLACEHOLDER_TEXTS"]

# The placeholder token names the Qwen-VL processors expand in the text they are given.
PLACEHOLDER_TEXTS = ("<|image_pad|>", "<|video_pad|>")
_LOGGED_PER_KIND = 5  # training logs this many warnings of a kind per process, then counts silently
_logged: dict[str, int] = {}


def _text(message: dict) -> str:
    return "".join(part["text"] for part in message["content"] if part["type"] == "text")


def check_conversation(conversation: Conversation) -> None:
    """Raise a ``DataError`` (kind ``media_in_answer``, ``empty_answer`` or ``special_token_text``) for
    a conversation that would train something other than what it says (module docstring)."""
    at = conversation.origin
    for turn, message in enumerate(conversation.messages):
        for part in message["content"]:
            if part["type"] == "text":
                found = [p for p in PLACEHOLDER_TEXTS if p in part["text"]]
                if found:
                    raise DataError(f"{at}, turn {turn}: the text holds {found[0]}, which the processor expands as a "
                                    "media placeholder. Fix: put media with <image>/<video> tags (or image/video "
                                    "parts) and remove the literal token from the text.",
                                    DataKind.SPECIAL_TOKEN_TEXT)
        if message["role"] != "assistant":
            continue
        media = [part["type"] for part in message["content"] if part["type"] in ("image", "video")]
        if media:
            raise DataError(f"{at}, turn {turn}: an assistant turn holds an {media[0]}; its placeholder tokens "
                            f"would be trained as the answer. Fix: move the <{media[0]}> tag to the user turn.",
                            DataKind.MEDIA_IN_ANSWER)
        # A tool-call turn (sharegpt ``function_call``, or ``tool_calls`` with no content) trains the
        # calls the template writes, not an empty answer; an untrained turn (prompt context, "weight": 0)
        # trains nothing at all, so its empty answer teaches nothing either.
        if not _text(message).strip() and not message.get("tool_calls") and conversation.trains(turn):
            raise DataError(f"{at}, turn {turn}: the assistant answer is empty, so only the end-of-turn token would "
                            "be trained (teaching the model to say nothing). Fix: write the answer, or drop the turn "
                            "or the record.", DataKind.EMPTY_ANSWER)


def conversation_warnings(conversation: Conversation) -> list[DataWarning]:
    """What a conversation does that training accepts but is likely a mistake (module docstring)."""
    roles = [m["role"] for m in conversation.messages if m["role"] != "system"]
    out = []
    if roles and roles[0] == "assistant":
        out.append(DataWarning("starts_with_assistant", f"{conversation.origin}: the conversation starts with an "
                               "assistant turn, which answers no question. Fix: add the user turn it answers."))
    if roles and roles[-1] == "user":
        out.append(DataWarning("ends_with_user", f"{conversation.origin}: the conversation ends with a user turn, "
                               "which is never answered (not trained). Fix: add the answer, or drop the turn."))
    return out


def log_warnings(warnings: list[DataWarning]) -> None:
    """Log warnings in training: the first few of each kind per process (the audit lists them all)."""
    for warning in warnings:
        count = _logged.get(warning.kind, 0)
        _logged[warning.kind] = count + 1
        if count < _LOGGED_PER_KIND:
            tail = "" if count + 1 < _LOGGED_PER_KIND else (
                f" (further '{warning.kind}' warnings are not logged; python -m qwenvl.tools.audit lists them all)")
            logger.warning("%s%s", warning.message, tail)


def conversation_of(source, spec: DatasetSpec, index: int):
    """The checked Conversation (or list, for a packed record) of record ``index``; raises DataError.

    The checks are training's (``check_conversation`` above), so a record
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
