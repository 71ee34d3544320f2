"""A conversation as chat-template pieces, each marked trained or not: labels built while rendering.

The renderer does not read labels off rendered tokens afterwards; it writes each
message as a list of ``Piece``s (nanochat's ``add_tokens(ids, mask)`` habit), so the
trained span of every turn is decided where the turn is written::

    <|im_start|>user\\n          TEMPLATE  -
    What colour?               TEXT      -       (the record's words: special-token text stays text)
    <|vision_start|>...        IMAGE     -
    <|im_end|>\\n               TEMPLATE  -
    <|im_start|>assistant\\n     TEMPLATE  -
    red                        TEXT      trained
    <|im_end|>                 TEMPLATE  trained (the model must learn to stop)
    \\n                         TEMPLATE  -

``"".join(piece.text)`` is exactly what the family's chat template renders
(``processor.apply_chat_template``); the renderer checks that for every sample, so
the pieces can never drift from the template.  What differs per family is read off
the template once (``ChatRules.of(processor)``): a default system prompt
(Qwen2-VL, Qwen2.5-VL), whether message text is trimmed and whether assistant turns
carry think blocks (Qwen3.5/3.6), and whether the template honours
``preserve_thinking`` (Qwen3.6).

Template-injected text in an assistant turn (the rule per family):

* the header ``<|im_start|>assistant\\n`` is prompt, ``<|im_end|>`` is trained, the
  newline after it is not;
* Qwen3.5/3.6 (think blocks): an answer without reasoning is trained in
  non-thinking mode: the empty ``<think>\\n\\n</think>\\n\\n`` the template writes is
  prompt, exactly the non-thinking generation prompt.  An answer with reasoning
  (``reasoning_content``, or ``<think>...</think>`` inside the answer) is trained in
  thinking mode: the prompt ends at ``<think>\\n`` (the thinking generation prompt)
  and the reasoning, ``\\n</think>\\n\\n``, the answer and ``<|im_end|>`` are trained.
  ``thinking="true"`` (``--enable_thinking true``) trains answers without reasoning in thinking mode too (the model
  learns to close an empty think block itself); ``"false"`` drops reasoning and trains
  every answer in non-thinking mode.

Reasoning in turns *before* the last user query: the released templates drop it
from the context (Qwen3.5) unless ``preserve_thinking`` (Qwen3.6).  It is never lost
silently: on Qwen3.6 such records render with ``preserve_thinking=True`` (every turn
keeps its think block, as when serving with that flag); on Qwen3.5 the record is
split per turn (``split_for_thinking``): one sample per reasoning turn, each ending
at that turn and training only the turns since the previous cut, so every turn is
trained once, in the context the model saw when it wrote it.

Untrained assistant turns (``Conversation.trains``: the assistant turns of a prompt-completion
``prompt``, a record's ``"weight": 0`` / ``"loss": false`` turns) are written exactly as trained
ones, every piece untrained: the answer, its reasoning, its tool calls and ``<|im_end|>``.  They are
context: their reasoning before the last query neither splits the record (Qwen3.5) nor asks for
``preserve_thinking`` (Qwen3.6), so the template drops it as it does for history at serving time.

Tools (``Conversation.tools``, assistant ``tool_calls``, ``tool`` turns) are written by
the template itself (``tool_pieces``): the tools block of the system turn, the text of
an assistant turn's calls and the wrapping of tool responses are read off the template
by rendering small probes, so the pieces still join to ``apply_chat_template(...,
tools=)``.  The calls are trained with their assistant turn; tool responses are prompt.
The record's own text inside them (every string of a tool definition and of a call:
names, descriptions, argument values; the responses) is TEXT, as user and assistant text
is, so special-token text typed there (``<|im_end|>``) stays plain text: the template is
rendered once more with each such string replaced by a mark, and the rendered text is
split where the marks were (``record_text_pieces``).  Dictionary keys (parameter and
property names) stay template text; a key holding special-token text is refused.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace

from jinja2 import TemplateError

from qwenvl.data.catalog.formats import Conversation
from qwenvl.data.errors import DataError, DataKind

__all__ = ["Piece", "TEMPLATE", "TEXT", "IMAGE", "VIDEO", "ChatRules", "THINKING_MODES", "conversation_pieces",
           "split_for_thinking", "pieces_text", "reasoning_and_answer", "template_view", "needs_preserve"]

TEMPLATE, TEXT, IMAGE, VIDEO = "template", "text", "image", "video"
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
THINKING_MODES = ("auto", "true", "false")  # the values of --enable_thinking


@dataclass(frozen=True)
class Piece:
    """A run of rendered text: ``kind`` says whose it is, ``trained`` whether its tokens are learnt.

    TEMPLATE text is the chat template's own (special-token text in it is a control
    token); TEXT is the record's (special-token text in it stays plain text); IMAGE and
    VIDEO are the template's placeholders, expanded by the processor later.
    """

    text: str
    kind: str = TEMPLATE
    trained: bool = False


@dataclass(frozen=True)
class ChatRules:
    """What a family's chat template does around the messages, read off the template itself."""

    default_system: str  # template text written when the conversation has no system message ("" when none)
    trims: bool  # message text is stripped of surrounding whitespace (Qwen3.5)
    think_blocks: bool  # assistant turns after the last user query carry <think>...</think> (Qwen3.5)
    preserve_thinking: bool  # the template honours preserve_thinking=True (Qwen3.6)
    thinking_by_default: bool  # the generation prompt opens a think block unless enable_thinking=False
    system_media: bool = True  # the template writes a system turn's images/videos (Qwen3-VL's keeps only its text)

    @classmethod
    def of(cls, processor) -> "ChatRules":
        """The rules of ``processor``'s chat template (probed once per template text)."""
        template = getattr(processor, "chat_template", None) or ""
        if template not in _RULES:
            _RULES[template] = cls._probe(processor)
        return _RULES[template]

    @classmethod
    def _probe(cls, processor) -> "ChatRules":
        def render(messages, **kwargs):
            return processor.apply_chat_template(messages, tokenize=False, **kwargs)

        def text(t):
            return [{"type": "text", "text": t}]

        one = [{"role": "user", "content": text(" q ")}, {"role": "assistant", "content": text(" a ")}]
        rendered = render(one)
        header = "<|im_start|>user\n"
        if header not in rendered or "<|im_start|>assistant\n" not in rendered:
            raise ValueError("the processor's chat template does not write ChatML turns (<|im_start|>user ...); "
                             "this renderer supports the Qwen-VL families' templates only")
        think_blocks = "<|im_start|>assistant\n<think>\n\n</think>\n\n" in rendered
        preserve = False
        if think_blocks:
            two = [{"role": "user", "content": text("q")},
                   {"role": "assistant", "content": text("a"), "reasoning_content": "r"},
                   {"role": "user", "content": text("q")}, {"role": "assistant", "content": text("b")}]
            preserve = "<think>\nr\n</think>" in render(two, preserve_thinking=True)
        prompt = render(one[:1], add_generation_prompt=True)
        try:
            system_media = "<|vision_start|>" in render([{"role": "system", "content": [{"type": "image"}]}, *one])
        except TemplateError:  # a template that refuses media in a system turn writes none either
            system_media = False
        return cls(default_system=rendered[:rendered.index(header)], trims=header + "q<|im_end|>" in rendered,
                   think_blocks=think_blocks, preserve_thinking=preserve,
                   thinking_by_default=prompt.endswith("<think>\n"), system_media=system_media)

    def generation_prompt(self, thinking: str = "auto") -> str:
        """What the template appends with ``add_generation_prompt`` in ``thinking`` mode."""
        if not self.think_blocks:
            return "<|im_start|>assistant\n"
        think = self.thinking_by_default if thinking == "auto" else thinking == "true"
        return "<|im_start|>assistant\n" + ("<think>\n" if think else "<think>\n\n</think>\n\n")

    def template_kwargs(self, thinking: str = "auto", preserve: bool = False) -> dict:
        """Keyword arguments that make ``apply_chat_template`` render what the pieces hold."""
        kwargs = {}
        if self.think_blocks and thinking != "auto":
            kwargs["enable_thinking"] = thinking == "true"
        if preserve:
            kwargs["preserve_thinking"] = True
        return kwargs


_RULES: dict[str, ChatRules] = {}


def pieces_text(pieces: list[Piece]) -> str:
    return "".join(p.text for p in pieces)


def _content_pieces(content: list[dict], trained: bool, trim: bool) -> list[Piece]:
    """The parts of one message as pieces; with ``trim``, whitespace around the whole is dropped."""
    pieces = []
    for part in content:
        if part["type"] == "text":
            pieces.append(Piece(part["text"], TEXT, trained))
        elif part["type"] == "image":
            pieces.append(Piece(IMAGE_PLACEHOLDER, IMAGE))
        elif part["type"] == "video":
            pieces.append(Piece(VIDEO_PLACEHOLDER, VIDEO))
    if trim:  # the template's `|trim` of the whole rendered content
        while pieces and pieces[0].kind == TEXT and not pieces[0].text.strip():
            pieces.pop(0)
        while pieces and pieces[-1].kind == TEXT and not pieces[-1].text.strip():
            pieces.pop()
        if pieces and pieces[0].kind == TEXT:
            pieces[0] = replace(pieces[0], text=pieces[0].text.lstrip())
        if pieces and pieces[-1].kind == TEXT:
            pieces[-1] = replace(pieces[-1], text=pieces[-1].text.rstrip())
    return [p for p in pieces if p.text]


def _text_of(message: dict, origin: str) -> str:
    if any(part["type"] != "text" for part in message["content"]):
        raise DataError(f"{origin}: an assistant turn holds an image or video; the chat templates write only "
                        "the text of assistant turns. Fix: move the media into a user turn.",
                        kind=DataKind.MEDIA_IN_ANSWER)
    return "".join(part["text"] for part in message["content"])


def reasoning_and_answer(message: dict, rules: ChatRules, origin: str) -> tuple[str | None, str]:
    """(reasoning or None, answer) of an assistant message, split as the family's template splits it."""
    text = _text_of(message, origin)
    if rules.trims:
        text = text.strip()
    reasoning = message.get("reasoning_content")
    if not rules.think_blocks:
        if reasoning:
            raise DataError(f"{origin}: the turn has reasoning_content, but this family's chat template has no "
                            "think blocks and would drop it. Fix: train a Qwen3.5/3.6 model, or write the "
                            "reasoning into the answer (<think>...</think>) if the model should learn to write it.")
        return None, text
    # The template takes reasoning_content when it is a string and writes the answer as it is, so
    # reasoning given both ways would train a second think block inside the answer; an opening
    # <think> never closed (a cut record) would train "<think>" as the answer's first word.
    if isinstance(reasoning, str) and "</think>" in text:
        raise DataError(f"{origin}: the turn gives its reasoning twice, as reasoning_content and as a "
                        "<think>...</think> block in the answer; the answer would be trained with the think block "
                        "inside it. Fix: keep one (drop the block from the answer, or drop reasoning_content).")
    if isinstance(reasoning, str):
        return reasoning, text
    if text.lstrip().startswith("<think>") and "</think>" not in text:
        raise DataError(f"{origin}: the answer opens a <think> block that is never closed, so \"<think>\" and the "
                        "reasoning would be trained as the answer. Fix: close the reasoning with </think> before "
                        "the answer (or move it to reasoning_content), or drop the record if it was cut short.")
    if "</think>" in text:
        head, answer = text.split("</think>")[0], text.split("</think>")[-1]
        return head.rstrip("\n").split("<think>")[-1].lstrip("\n"), answer.lstrip("\n")
    return None, text


def _last_query(messages: list[dict]) -> int:
    """Index of the last user turn that is a real query (not a wrapped tool response), as the template finds it."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m["role"] == "user":
            text = "".join(p.get("text", "") for p in m["content"]).strip()
            if not (text.startswith("<tool_response>") and text.endswith("</tool_response>")):
                return i
    return -1


def _has_reasoning(message: dict, rules: ChatRules, origin: str) -> bool:
    reasoning, _ = reasoning_and_answer(message, rules, origin)
    return bool(reasoning and reasoning.strip())


def needs_preserve(conversation: Conversation, rules: ChatRules, thinking: str) -> bool:
    """True when reasoning before the last query must be kept by ``preserve_thinking`` (Qwen3.6)."""
    if not (rules.think_blocks and rules.preserve_thinking) or thinking == "false":
        return False
    q = _last_query(conversation.messages)
    # Only trained turns count: untrained context (a prompt's answers, a "weight": 0 turn) is rendered as
    # the template renders history, its earlier reasoning dropped, as at serving time without the flag.
    return any(conversation.trains(i) and _has_reasoning(conversation.messages[i], rules, conversation.origin)
               for i in range(max(q, 0)))


def split_for_thinking(conversation: Conversation, rules: ChatRules, thinking: str = "auto") -> list[Conversation]:
    """The samples a conversation trains as: itself, or one per reasoning turn on Qwen3.5 (see the module doc).

    A cut ends at a trained assistant turn with reasoning that the template would drop from
    the full conversation's context (a user query follows it).  Each part is a prefix of the
    conversation whose ``trained_from`` skips the turns an earlier part trained.  An untrained
    turn (``Conversation.trains``) is context: never a cut, its earlier reasoning dropped as the
    template drops it; the last part is left out when every turn after the last cut is untrained
    (it would train nothing), so a single part may be a prefix of the conversation.
    """
    if not rules.think_blocks or rules.preserve_thinking or thinking == "false":
        return [conversation]
    messages, origin = conversation.messages, conversation.origin
    q = _last_query(messages)
    cuts = [i for i in range(max(q, 0)) if conversation.trains(i) and _has_reasoning(messages[i], rules, origin)]
    if not cuts:
        return [conversation]
    # dataclasses.replace keeps every other field of the conversation (its media conventions).
    parts, start = [], conversation.trained_from
    for i in cuts:
        parts.append(replace(conversation, messages=messages[:i + 1], origin=f"{origin}, turns up to {i}",
                             trained_from=start))
        start = i + 1
    last = replace(conversation, trained_from=start)
    if any(last.trains(i) for i in range(start, len(messages))):
        parts.append(last)
    return parts


def _assistant_pieces(message: dict, rules: ChatRules, shown: bool, trained: bool, thinking: str,
                      origin: str, calls: list[Piece] | None = None) -> list[Piece]:
    reasoning, answer = reasoning_and_answer(message, rules, origin)
    if thinking == "false" and reasoning is not None:
        # Non-thinking mode throughout: the reasoning is dropped and the answer rendered as a
        # record without reasoning would be (the template trims it).
        reasoning = None
        answer = answer.strip() if rules.trims else answer
    reasoning = (reasoning or "").strip()
    pieces = []
    if rules.think_blocks and shown:
        if reasoning or thinking == "true":  # thinking mode: the prompt ends with "<think>\n"
            pieces += [Piece("<|im_start|>assistant\n<think>\n"), Piece(reasoning, TEXT, trained),
                       Piece("\n</think>\n\n", TEMPLATE, trained)]
        else:  # non-thinking mode: the empty think block is the prompt
            pieces.append(Piece("<|im_start|>assistant\n<think>\n\n</think>\n\n"))
    else:
        pieces.append(Piece("<|im_start|>assistant\n"))
    # Tool calls (the template's text for them) are the assistant's output: trained with the answer.
    pieces += [Piece(answer, TEXT, trained), *(replace(p, trained=trained) for p in calls or ()),
               Piece("<|im_end|>", TEMPLATE, trained), Piece("\n")]
    return [p for p in pieces if p.text]


def conversation_pieces(conversation: Conversation, rules: ChatRules, thinking: str = "auto",
                        add_generation_prompt: bool = False, render=None) -> tuple[list[Piece], dict]:
    """(pieces, template kwargs) of ``conversation``: the pieces join to what the template renders
    with those kwargs; the assistant turns ``conversation.trains`` are trained (answer, reasoning, tool
    calls and ``<|im_end|>``), the others are rendered alike with every piece untrained.

    ``render(messages, **kwargs) -> str`` is the processor's chat template (untokenized); it is
    needed only for conversations with tools, whose tool text the template writes (``tool_pieces``).
    """
    if thinking not in THINKING_MODES:
        raise ValueError(f"thinking must be one of {THINKING_MODES}, not {thinking!r}")
    messages, origin = conversation.messages, conversation.origin
    if conversation.uses_tools and render is None:
        raise ValueError("a conversation with tools needs the chat template (render=) to write its tool text")
    preserve = needs_preserve(conversation, rules, thinking)
    q = _last_query(messages)
    if q < 0 and rules.think_blocks:
        raise DataError(f"{origin}: no user turn; the chat template needs a user query before the answers.")
    pieces: list[Piece] = []
    has_system = bool(messages) and messages[0]["role"] == "system"
    if conversation.tools:
        pieces += tool_system_pieces(messages[0] if has_system else None, conversation.tools, rules, render, origin)
    elif not has_system and rules.default_system:
        pieces.append(Piece(rules.default_system))
    i = 0
    while i < len(messages):
        message = messages[i]
        role = message["role"]
        if role == "system":
            if i:
                raise DataError(f"{origin}: a system turn at position {i}; it must be the first turn. Fix: move it "
                                "to the start of the conversation, or drop it.")
            media = [p["type"] for p in message["content"] if p["type"] != "text"]
            if media and not rules.system_media:
                raise DataError(f"{origin}: the system turn holds an {media[0]}; this family's chat template writes "
                                f"only the text of a system turn, so the {media[0]} would never reach the model. "
                                f"Fix: move the <{media[0]}> tag (or part) into the user turn.")
            if not conversation.tools:  # with tools, the system turn was written with the tools block
                pieces += [Piece("<|im_start|>system\n"),
                           *_content_pieces(message["content"], False, rules.trims), Piece("<|im_end|>\n")]
        elif role == "user":
            pieces += [Piece("<|im_start|>user\n"), *_content_pieces(message["content"], False, rules.trims),
                       Piece("<|im_end|>\n")]
        elif role == "assistant":
            calls = tool_call_pieces(message, render, origin) if message.get("tool_calls") else []
            pieces += _assistant_pieces(message, rules, shown=preserve or i > q, trained=conversation.trains(i),
                                        thinking=thinking, origin=origin, calls=calls)
        elif role == "tool":  # a run of tool responses is one user-side turn in the templates
            end = i
            while end < len(messages) and messages[end]["role"] == "tool":
                end += 1
            pieces += tool_response_pieces(messages[i:end], rules, render)
            i = end
            continue
        else:
            raise DataError(f"{origin}: unknown role {role!r}")
        i += 1
    if add_generation_prompt:
        pieces.append(Piece(rules.generation_prompt(thinking)))
    kwargs = rules.template_kwargs(thinking, preserve)
    if conversation.tools:
        kwargs["tools"] = conversation.tools
    return pieces, kwargs


# -- tools: the template writes them; its text is read off small probe renders -------------
_PROBE_USER = {"role": "user", "content": [{"type": "text", "text": "q"}]}
_MARK = "QWENVL_PIECE_MARK_{}_"


def _split_marked(text: str, marks: list[str], contents: list[list[Piece]], origin: str) -> list[Piece]:
    """``text`` with each mark replaced by its content pieces; the text around the marks is TEMPLATE."""
    pieces = []
    for mark, content in zip(marks, contents):
        if text.count(mark) != 1:
            raise DataError(f"{origin}: the chat template does not write tool text in a form the renderer "
                            "can follow (a probe's content was not copied once).")
        before, text = text.split(mark)
        pieces += [Piece(before), *content]
    pieces.append(Piece(text))
    return [p for p in pieces if p.text]


# Every Qwen special token is written <|name|>; such text in a dictionary key cannot be kept as text
# (keys stay template text: the templates look some of them up), so it is refused.
_SPECIAL_LIKE = re.compile(r"<\|[^|<>\s]+\|>")
_STRING_MARK = "QWENVL_PIECE_MARK_S{}_"
_STRING_MARK_RE = re.compile(r"QWENVL_PIECE_MARK_S(\d+)_")


def _mark_strings(value, strings: list[str], origin: str, path: str = ""):
    """A copy of ``value`` with every string replaced by a mark (``strings[k]`` is mark k's original);
    dictionary keys are kept, and refused if they hold special-token text."""
    if isinstance(value, str):
        strings.append(value)
        return _STRING_MARK.format(len(strings) - 1)
    if isinstance(value, dict):
        for key in value:
            if _SPECIAL_LIKE.search(str(key)):
                raise DataError(f"{origin}: the key {key!r} of {path or 'a tool'} holds special-token text, which "
                                "the chat template would write as a control token. Fix: rename the key "
                                "(special-token text is kept as plain text in values only).",
                                DataKind.SPECIAL_TOKEN_TEXT)
        return {k: _mark_strings(v, strings, origin, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mark_strings(v, strings, origin, path) for v in value]
    return value


def _rendered_forms(text: str) -> list[str]:
    """How a template may write a string: as it is, or inside JSON (``tojson``, with or without ASCII escapes)."""
    forms = [text, json.dumps(text, ensure_ascii=False)[1:-1], json.dumps(text)[1:-1]]
    return list(dict.fromkeys(forms))


def record_text_pieces(marked: str, real: str, strings: list[str], origin: str) -> list[Piece]:
    """``real`` (the template's text with the record's strings) as TEMPLATE pieces and TEXT pieces,
    the TEXT ones where ``marked`` (the same render with the strings marked) has a mark.

    Each mark's text in ``real`` is the original string in one of its rendered forms (raw or
    JSON-escaped): the one after which the template's next stretch follows.  The pieces are
    checked to join to ``real``; a template that writes the strings another way is refused.
    """
    pieces, pos, last = [], 0, 0
    matches = list(_STRING_MARK_RE.finditer(marked))
    for k, match in enumerate(matches):
        before = marked[last:match.start()]
        nxt_end = matches[k + 1].start() if k + 1 < len(matches) else len(marked)
        after = marked[match.end():nxt_end]
        if not real.startswith(before, pos):
            break
        pos += len(before)
        pieces.append(Piece(before))
        for form in _rendered_forms(strings[int(match.group(1))]):
            if real.startswith(form + after, pos) and (k + 1 < len(matches) or pos + len(form + after) == len(real)):
                pieces.append(Piece(form, TEXT))
                pos += len(form)
                break
        else:
            break
        last = match.end()
    else:
        pieces.append(Piece(marked[last:]))
        if pieces_text(pieces) == real:
            return [p for p in pieces if p.text]
    raise DataError(f"{origin}: the chat template writes the record's tool text in a form the renderer cannot "
                    "follow (neither as it is nor JSON-escaped). Fix: use the family's released chat template.")


def _replace_mark(pieces: list[Piece], mark: str, content: list[Piece], origin: str) -> list[Piece]:
    """``pieces`` with ``mark`` (once, in a TEMPLATE piece) replaced by ``content``."""
    out, found = [], 0
    for piece in pieces:
        if piece.kind == TEMPLATE and mark in piece.text:
            found += piece.text.count(mark)
            before, after = piece.text.split(mark, 1)
            out += [Piece(before, TEMPLATE, piece.trained), *content, Piece(after, TEMPLATE, piece.trained)]
        else:
            out.append(piece)
    if found != 1:
        raise DataError(f"{origin}: the chat template does not write tool text in a form the renderer "
                        "can follow (a probe's content was not copied once).")
    return [p for p in out if p.text]


def tool_system_pieces(system: dict | None, tools: list, rules: ChatRules, render, origin: str = "") -> list[Piece]:
    """The system turn as the template writes it with ``tools`` (its tools block): the record's
    system text (if any) and the strings of its tool definitions as TEXT."""
    probe = [_PROBE_USER] if system is None else [
        {"role": "system", "content": [{"type": "text", "text": _MARK.format(0)}]}, _PROBE_USER]
    strings: list[str] = []
    marked_tools = _mark_strings(tools, strings, origin, "tools")

    def head(text: str) -> str:
        return text[:text.rfind("<|im_start|>user\n")]

    pieces = record_text_pieces(head(render(probe, tools=marked_tools)), head(render(probe, tools=tools)), strings,
                                origin)
    if system is None:
        return pieces
    return _replace_mark(pieces, _MARK.format(0), _content_pieces(system["content"], False, rules.trims),
                         origin or "the system turn")


def tool_call_pieces(message: dict, render, origin: str) -> list[Piece]:
    """The pieces the template writes for an assistant turn's ``tool_calls`` (between its answer
    and ``<|im_end|>``), read off the template: the turn rendered with and without its calls; the
    calls' names and argument values are TEXT (the flags that they are trained are set by the caller)."""
    view = {"role": "assistant", "content": [p for p in message["content"] if p["type"] == "text"]}
    end = "<|im_end|>\n"
    strings: list[str] = []
    marked_calls = _mark_strings(message["tool_calls"], strings, origin, "tool_calls")
    without = render([_PROBE_USER, view])
    with_calls = render([_PROBE_USER, {**view, "tool_calls": message["tool_calls"]}])
    with_marks = render([_PROBE_USER, {**view, "tool_calls": marked_calls}])
    stem = without[:-len(end)]
    if not (without.endswith(end) and all(t.endswith(end) and t.startswith(stem) for t in (with_calls, with_marks))):
        raise DataError(f"{origin}: the chat template does not write tool calls after the answer text, so the "
                        "renderer cannot mark them trained. Fix: use the family's released chat template.")
    return record_text_pieces(with_marks[len(stem):-len(end)], with_calls[len(stem):-len(end)], strings, origin)


def tool_response_pieces(run: list[dict], rules: ChatRules, render) -> list[Piece]:
    """A run of ``tool`` turns as the template wraps them (Qwen: one user turn of
    ``<tool_response>`` blocks); the responses' text is TEXT, never trained."""
    marks = [_MARK.format(k) for k in range(len(run))]
    base = render([_PROBE_USER])
    text = render([_PROBE_USER, *({"role": "tool", "content": [{"type": "text", "text": m}]} for m in marks)])
    if not text.startswith(base):
        raise DataError("the chat template renders tool responses in a form the renderer cannot follow "
                        "(earlier turns change). Fix: use the family's released chat template.")
    return _split_marked(text[len(base):], marks,
                         [_content_pieces(m["content"], False, rules.trims) for m in run], "a tool response")


def template_view(conversation: Conversation, rules: ChatRules, thinking: str = "auto") -> list[dict]:
    """The messages as the template should see them to render what the pieces hold: bare
    media placeholders, ``reasoning_content`` passed on; in ``"false"`` mode the answers without
    their reasoning."""
    out = []
    for message in conversation.messages:
        parts = [{"type": p["type"]} if p["type"] != "text" else {"type": "text", "text": p["text"]}
                 for p in message["content"]]
        item = {"role": message["role"], "content": parts}
        if message.get("tool_calls"):
            item["tool_calls"] = message["tool_calls"]
        if message["role"] == "assistant" and rules.think_blocks:
            if thinking == "false":
                _, answer = reasoning_and_answer(message, rules, conversation.origin)
                item["content"] = [{"type": "text", "text": answer}]
            elif isinstance(message.get("reasoning_content"), str):
                item["reasoning_content"] = message["reasoning_content"]
        out.append(item)
    return out
