"""Collators: rendered samples -> a batch for ``model(**batch)``.

Both collators take what ``SampleRenderer.render`` returns (a dict per sample, or
``{"pack": [sample, ...]}`` for a packed record) and differ only in layout.

Padded (default)::

    [{input_ids: [a b c], ...}, {input_ids: [d e], ...}]
    -> input_ids      [[a b c], [d e PAD]]
       attention_mask [[1 1 1], [1 1 0]]
       labels         right-padded with -100
       position_ids   (3, 2, 3) mRoPE rows, padding at position 0

Flattened (``--data_flatten``, ``--data_packing``)::

    -> input_ids    [[a b c d e]]           (one row, no padding, no attention mask)
       position_ids (4, 1, 5): row 0 = [0 1 2 0 1] (text positions restarting per sample),
                               rows 1-3 = the samples' mRoPE rows side by side

With four position rows and no attention mask, transformers builds a block-diagonal
causal mask from row 0, so samples never attend to each other (FlashAttention-style
varlen kernels get the same boundaries from it).  Visual tensors are concatenated in
sample order in both layouts, which is the order their placeholder tokens appear.
"""
from __future__ import annotations

import torch

from qwenvl.data.render import IGNORE_INDEX
from qwenvl.data.skips import Skipped

VISUAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def _unpack(items: list) -> list[dict]:
    """Flatten packed records into their samples and drop samples the bad-sample policy skipped.

    When every item was skipped, the first one's stand-in (the next item that renders,
    chosen by index alone: the same on every rank) fills the micro-batch, so the rank
    still takes its step and no other rank waits for it (see ``qwenvl.data.skips``).
    """
    samples, skipped = [], []
    for item in items:
        if item is None:
            continue
        if isinstance(item, Skipped):
            skipped.append(item)
            continue
        samples.extend(item["pack"] if "pack" in item else [item])
    if not samples and skipped:
        stand_in = skipped[0].stand_in()
        samples = list(stand_in["pack"]) if "pack" in stand_in else [stand_in]
    if not samples:
        raise RuntimeError("the micro-batch is empty: the sampler gave no items.")
    return samples


def _concat_visual(samples: list[dict]) -> dict:
    batch = {}
    for key in VISUAL_KEYS:
        parts = [s[key] for s in samples if key in s]
        if parts:
            batch[key] = torch.cat(parts, dim=0)
    return batch


class PaddedCollator:
    """Right-pad samples into a (B, L) batch with an attention mask."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list) -> dict:
        samples = _unpack(items)
        length = max(s["input_ids"].shape[0] for s in samples)
        n = len(samples)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        position_ids = torch.zeros((3, n, length), dtype=torch.long)
        for row, s in enumerate(samples):
            k = s["input_ids"].shape[0]
            input_ids[row, :k] = s["input_ids"]
            labels[row, :k] = s["labels"]
            attention_mask[row, :k] = 1
            position_ids[:, row, :k] = s["position_ids"]
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                 "position_ids": position_ids}
        batch.update(_concat_visual(samples))
        return batch


class FlattenedCollator:
    """Concatenate samples into one (1, L) row with 4-row position ids and no attention mask."""

    def __call__(self, items: list) -> dict:
        samples = _unpack(items)
        input_ids = torch.cat([s["input_ids"] for s in samples])[None]
        labels = torch.cat([s["labels"] for s in samples])[None]
        text_positions = torch.cat([torch.arange(s["input_ids"].shape[0]) for s in samples])
        mrope = torch.cat([s["position_ids"] for s in samples], dim=1)
        position_ids = torch.cat([text_positions[None], mrope], dim=0)[:, None, :]
        # A KV cache would make transformers ignore the per-sample boundaries in row 0.
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "use_cache": False}
        batch.update(_concat_visual(samples))
        return batch


def make_collator(flatten: bool, pad_token_id: int):
    """The collator for ``--data_flatten`` / ``--data_packing`` (flattened) or the default (padded)."""
    return FlattenedCollator() if flatten else PaddedCollator(pad_token_id)
