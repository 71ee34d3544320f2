"""The prompt of a conversation: the one place where messages become chat-template text.

Training and inference must show the model the same tokens.  ``SampleRenderer``
renders a whole conversation as chat pieces (``chat_pieces``, checked against the
template's text, which ``chat_text`` gives); the chat and evaluation tools render the
conversation *up to* the reply they want with the same pieces plus the generation
prompt (``SampleRenderer.encode(prompt, add_generation_prompt=True)``).  Both go
through ``template_messages`` and the family's own chat template, so for every family::

    chat_text(p, conv_without_last_reply, add_generation_prompt=True)
        == chat_text(p, conv)[: up to and including "<|im_start|>assistant\\n" of the last reply]

and, tokenized by the same processor with the same media, the prompt's ``input_ids``
are a prefix of the training sample's ``input_ids`` (tested in
``tests/tools/test_chat.py`` for image, multi-image, video and text conversations).

Helpers for the tools:

* ``split_last_reply(conversation)`` -> (prompt conversation, reference text): what
  evaluation asks and what it expects back;
* ``user_conversation(text, images, videos, system)`` -> the conversation of one chat
  turn, media placed the way the training data places them (``<image>`` tags, or
  ``"<image>\\n"`` in front of the text when it has none, as LLaVA-style records do).
"""
from __future__ import annotations

import os

from jinja2 import TemplateError, TemplateSyntaxError

from qwenvl.data.catalog.formats import MEDIA_TAGS, Conversation
from qwenvl.data.errors import DataError

__all__ = ["template_messages", "chat_text", "raise_if_template_failure", "renders_tools", "refuse_tools_unless_rendered",
           "last_reply_index", "split_last_reply", "user_conversation", "reply_text"]

def template_messages(conversation: Conversation) -> tuple[list[dict], list, list]:
    """Messages in the processor's chat-template form, plus image and video refs in tag order.

    Media parts become bare ``{"type": "image"}`` / ``{"type": "video"}`` placeholders
    (the template writes the vision tokens; the processor expands them from the media
    passed alongside, in the same order).
    """
    messages, images, videos = [], [], []
    for message in conversation.messages:
        parts = []
        for part in message["content"]:
            kind = part["type"]
            if kind == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                images.append(part["image"])
                parts.append({"type": "image"})
            elif kind == "video":
                videos.append(part["video"])
                parts.append({"type": "video"})
            else:
                raise DataError(f"{conversation.origin}: unknown content part type {kind!r}")
        rendered = {"role": message["role"], "content": parts}
        if message.get("tool_calls"):
            rendered["tool_calls"] = message["tool_calls"]
        messages.append(rendered)
    return messages, images, videos


_PROBE_TOOL = "qwenvl_probe_tool"
_TOOL_SUPPORT: dict[str, bool] = {}  # by template text


def renders_tools(processor) -> bool:
    """Whether ``processor``'s chat template writes tools, tool calls and tool responses.

    Asked of the template itself, once per template: a probe conversation with a tool,
    a tool call and a tool response must show all three in the text.  The released
    Qwen3-VL templates do; the Qwen2-VL and Qwen2.5-VL processor templates do not (they
    would print a ``tool`` turn as a plain role and drop the calls).
    """
    key = str(getattr(processor, "chat_template", None))
    if key not in _TOOL_SUPPORT:
        tool = {"type": "function", "function": {"name": _PROBE_TOOL, "description": "probe",
                                                 "parameters": {"type": "object", "properties": {}}}}
        probe = [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                 {"role": "assistant", "content": [], "tool_calls": [
                     {"type": "function", "function": {"name": _PROBE_TOOL + "_call", "arguments": {}}}]},
                 {"role": "tool", "content": [{"type": "text", "text": "qwenvl_probe_result"}]}]
        try:
            text = processor.apply_chat_template(probe, tools=[tool], tokenize=False)
        except Exception:  # a template that raises on tools does not support them
            text = ""
        _TOOL_SUPPORT[key] = all(word in text for word in (
            f'"name": "{_PROBE_TOOL}"', _PROBE_TOOL + "_call", "qwenvl_probe_result")) and "<|im_start|>tool" not in text
    return _TOOL_SUPPORT[key]


def refuse_tools_unless_rendered(processor, conversation: Conversation) -> None:
    """Raise DataError when ``conversation`` has tools, tool calls or tool results and
    ``processor``'s chat template cannot render them (see ``renders_tools``)."""
    if conversation.uses_tools and not renders_tools(processor):
        raise DataError(
            f"{conversation.origin}: the record has tools, function calls or tool results, and this model's "
            "chat template does not render them (the Qwen2-VL / Qwen2.5-VL templates have no tool format), "
            "so it cannot be trained the way the model is served. Fix: drop 'tools', 'function_call' and "
            "'observation' turns from these records, or train a family whose template has tools (Qwen3-VL).")


def chat_text(processor, conversation: Conversation, add_generation_prompt: bool = False) -> tuple[str, list, list]:
    """The chat-template text of ``conversation`` and its image and video refs, in order.

    ``add_generation_prompt=False`` renders the conversation as it is trained on;
    ``True`` appends the assistant header (``<|im_start|>assistant\\n``) that a
    generation continues from.
    """
    messages, images, videos = template_messages(conversation)
    kwargs = {}
    refuse_tools_unless_rendered(processor, conversation)
    if conversation.tools:
        kwargs["tools"] = conversation.tools
    try:
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **kwargs)
    except (TypeError, TemplateError) as exc:
        raise_if_template_failure(conversation, exc)
        raise
    return text, images, videos


def raise_if_template_failure(conversation: Conversation, exc: Exception) -> None:
    """Raise a DataError naming the record and the fix when ``exc`` is the chat template failing on
    ``conversation`` (its own ``raise_exception``, or a jinja filter given data it cannot take, as
    Qwen3.5's ``arguments|items`` given text); return for anything else, which the caller re-raises:
    a TypeError of our own code is a bug (an ``internal_error``), not a bad record, and a template that
    does not parse is the model folder's problem, not the record's."""
    if isinstance(exc, TemplateSyntaxError):
        return
    if isinstance(exc, TypeError) and not _raised_in_template(exc):
        return
    raise DataError(template_failure(conversation, exc)) from exc


def _raised_in_template(exc: BaseException) -> bool:
    # The innermost frame: jinja's compiled template ("<template>") or jinja itself (its filters).
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename if tb is not None else ""
    return filename == "<template>" or f"{os.sep}jinja2{os.sep}" in filename


def template_failure(conversation: Conversation, exc: Exception) -> str:
    """Why the chat template could not render ``conversation``, naming the record and the fix."""
    message = f"{conversation.origin}: this model's chat template cannot render the record ({exc})."
    loose = [call["function"]["arguments"] for m in conversation.messages for call in m.get("tool_calls") or []
             if not isinstance(call.get("function", {}).get("arguments"), dict)]
    if loose and "mapping" in str(exc):
        # Qwen3.5/3.6 write each argument as a <parameter=name> block, so they need the arguments as an object;
        # a JSON string of one is read as such (formats.py), anything else stays text.
        return (f"{message} A tool call's arguments are not a JSON object ({str(loose[0])[:80]!r}), and this "
                'template writes each argument by name. Fix: write "arguments" as an object ({"city": "Paris"}) '
                "or a JSON string of one.")
    return f"{message} Fix: change the record so the template can render it, or drop it."


def reply_text(message: dict) -> str:
    """The text of an assistant message (its text parts joined, as the template writes them)."""
    return "".join(part["text"] for part in message["content"] if part["type"] == "text")


def last_reply_index(conversation: Conversation) -> int | None:
    """Index of the last trained assistant turn (``Conversation.trains``), else of the last assistant turn,
    else None: the reply a sample is asked for."""
    assistants = [i for i, m in enumerate(conversation.messages) if m["role"] == "assistant"]
    trained = [i for i in assistants if conversation.trains(i)]
    return (trained or assistants or [None])[-1]


def split_last_reply(conversation: Conversation) -> tuple[Conversation, str]:
    """(the conversation before its last trained assistant turn, that turn's text).

    Everything before the reply stays, earlier replies included: a multi-turn sample is
    asked its last question with its whole history, as in training.  Assistant turns the
    record leaves untrained (``"weight": 0`` / ``"loss": false``) after it are not references:
    the reply is the last answer the record trains.
    """
    last = last_reply_index(conversation)
    if last is None:
        raise DataError(f"{conversation.origin}: no assistant turn to take the reference answer from.")
    if not any(m["role"] == "user" for m in conversation.messages[:last]):
        raise DataError(f"{conversation.origin}: the last assistant turn has no user turn before it to ask.")
    prompt = Conversation(messages=conversation.messages[:last], origin=conversation.origin,
                          tools=conversation.tools, bbox_format=conversation.bbox_format)
    return prompt, reply_text(conversation.messages[last])


def user_conversation(text: str, images: list | None = None, videos: list | None = None,
                      system: str | None = None, origin: str = "chat") -> Conversation:
    """The conversation of one user turn with ``images`` and ``videos`` (paths or PIL images).

    ``<image>``/``<video>`` tags in ``text`` say where each medium goes, as in the
    annotation files; their count must match.  Text without tags gets one
    ``"<image>\\n"`` per image and ``"<video>\\n"`` per video in front, the layout of
    LLaVA-style training records (``"<image>\\nWhat colour is the shape?"``), so a
    model fine-tuned on such records is asked in the form it learnt.
    """
    images, videos = list(images or []), list(videos or [])
    tags = MEDIA_TAGS.findall(text)
    if not tags:
        text = "<image>\n" * len(images) + "<video>\n" * len(videos) + text
    elif tags.count("<image>") != len(images) or tags.count("<video>") != len(videos):
        raise DataError(f"{origin}: the prompt has {tags.count('<image>')} <image> and {tags.count('<video>')} "
                        f"<video> tag(s) but {len(images)} image(s) and {len(videos)} video(s) were given. Fix: "
                        "one tag per medium, or no tags at all (media then go before the text).")
    queues = {"<image>": iter(images), "<video>": iter(videos)}
    parts = []
    for piece in MEDIA_TAGS.split(text):
        if piece in queues:
            kind = piece[1:-1]
            parts.append({"type": kind, kind: next(queues[piece])})
        elif piece:
            parts.append({"type": "text", "text": piece})
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system is not None else []
    messages.append({"role": "user", "content": parts})
    return Conversation(messages=messages, origin=origin)
