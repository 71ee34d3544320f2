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

A token is trained when the last character it covers is (a token that straddles a
prompt/answer boundary belongs to the piece it ends in).
"""
from __future__ import annotations

import bisect
import re

from .chat_pieces import IMAGE, TEMPLATE, TEXT, VIDEO, Piece

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

    def _items(self, pieces: list[Piece]):
        """The sequence as items: ("id", token id, trained) or ("run", text, char ends, char flags)."""
        items, texts, flags = [], [], []

        def flush():
            if texts:
                ends = []
                total = 0
                for t in texts:
                    total += len(t)
                    ends.append(total)
                items.append(("run", "".join(texts), ends, list(flags)))
                texts.clear()
                flags.clear()

        for piece in pieces:
            if not piece.text:
                continue
            if piece.kind == TEXT:
                texts.append(piece.text)
                flags.append(piece.trained)
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
                    texts.append(chunk)
                    flags.append(piece.trained)
        flush()
        return items

    def encode(self, pieces: list[Piece]) -> tuple[list[int], list[bool]]:
        """Token ids of ``pieces`` and, per token, whether it is trained."""
        items = self._items(pieces)
        runs = [item[1] for item in items if item[0] == "run"]
        encoded = self.tokenizer(runs, add_special_tokens=False, split_special_tokens=True,
                                 return_offsets_mapping=True) if runs else {"input_ids": [], "offset_mapping": []}
        ids, trained, r = [], [], 0
        for item in items:
            if item[0] == "id":
                ids.append(item[1])
                trained.append(item[2])
                continue
            _, _, ends, flags = item
            run_ids, offsets = encoded["input_ids"][r], encoded["offset_mapping"][r]
            r += 1
            ids.extend(run_ids)
            for start, end in offsets:
                last = max(end - 1, start)  # the last character the token covers
                trained.append(flags[bisect.bisect_right(ends, last)])
        return ids, trained
