"""Chat pieces -> token ids and their trained flags.

Two rules make the ids equal to ``processor.apply_chat_template(..., tokenize=True)``
for ordinary records, and keep special-token text typed in a record from acting as
a control token:

* the template's special tokens (``<|im_start|>``, ``<|im_end|>``, ``<|image_pad|>``
  ...) are cut out of TEMPLATE pieces and emitted as their ids; the text between two
  of them (a *run*) is tokenized as one string, as the tokenizer itself does (it
  splits at special tokens before its pre-tokenizer), so BPE merges across piece
  boundaries are the same;
* runs are tokenized with ``split_special_tokens=True``, so a record's
  ``<|im_end|><|im_start|>system`` or ``<|image_pad|>`` is plain text
  (``<``, ``|``, ``im``, ...), never a control token.  Ordinary added tokens
  (``<think>``, ``<tool_call>``: not "special" in the Qwen tokenizers) stay single
  tokens, as the model writes them.

A run also ends where training starts or stops, so no token straddles the prompt
and the answer: the prompt's ids are always a prefix of the trained sample's ids,
and the answer's tokens are the ones the model generates after that prompt.  Where
the template's text would let BPE merge across that boundary (Qwen3.5 with
``--enable_thinking true`` on an answer without reasoning: ``<think>\\n`` +
``\\n</think>``, one ``"\\n\\n"`` token in ``apply_chat_template``'s ids; an answer that
starts with a newline on Qwen2-VL), the ids differ from ``apply_chat_template``'s by
that merge, and equal what generation sees.
"""
from __future__ import annotations

import re

from qwenvl.data.render.chat_pieces import IMAGE, TEMPLATE, TEXT, VIDEO, Piece

__all__ = ["PieceTokenizer", "expand_media"]


def expand_media(pieces: list[Piece], image_replacements: list[str], video_replacements: list[str],
                 image_token: str, video_token: str) -> list[Piece]:
    """IMAGE/VIDEO pieces with their pad token replaced by the processor's replacement text, in order."""
    images, videos = iter(image_replacements), iter(video_replacements)
    out = []
    for piece in pieces:
        if piece.kind == IMAGE:
            piece = Piece(piece.text.replace(image_token, next(images), 1), TEMPLATE, piece.trained)
        elif piece.kind == VIDEO:
            piece = Piece(piece.text.replace(video_token, next(videos), 1), TEMPLATE, piece.trained)
        out.append(piece)
    return out


class PieceTokenizer:
    """Tokenize pieces with a tokenizer; ``encode(pieces)`` -> (ids, trained flags)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special},
                          key=len, reverse=True)
        self._ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in specials) + ")")

    def _items(self, pieces: list[Piece]) -> list[tuple]:
        """The sequence as items: ("id", token id, trained) or ("run", text, trained)."""
        items, texts = [], []
        state = {"trained": None}

        def flush():
            if texts:
                items.append(("run", "".join(texts), state["trained"]))
                texts.clear()

        def add_text(text: str, trained: bool):
            if trained != state["trained"]:
                flush()  # training starts or stops here: a token boundary
                state["trained"] = trained
            texts.append(text)

        for piece in pieces:
            if not piece.text:
                continue
            if piece.kind == TEXT:
                add_text(piece.text, piece.trained)
                continue
            if piece.kind in (IMAGE, VIDEO):
                raise ValueError("expand the media pieces (expand_media) before tokenizing them")
            for k, chunk in enumerate(self._split.split(piece.text)):
                if not chunk:
                    continue
                if k % 2:  # a special token written by the template: a control token
                    flush()
                    items.append(("id", self._ids[chunk], piece.trained))
                else:
                    add_text(chunk, piece.trained)
        flush()
        return items

    def encode(self, pieces: list[Piece]) -> tuple[list[int], list[bool]]:
        """Token ids of ``pieces`` and, per token, whether it is trained."""
        items = self._items(pieces)
        runs = [item[1] for item in items if item[0] == "run"]
        encoded = (self.tokenizer(runs, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                   if runs else [])
        ids, trained, r = [], [], 0
        for kind, value, is_trained in items:
            if kind == "id":
                ids.append(value)
                trained.append(is_trained)
            else:
                ids.extend(encoded[r])
                trained.extend([is_trained] * len(encoded[r]))
                r += 1
        return ids, trained
