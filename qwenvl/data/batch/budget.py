"""Size a token budget so that a packed micro-batch holds a given number of samples on average.

The official recipes fix samples per optimizer step (per GPU: batch size x accumulation
steps, e.g. 4 x 4 = 16).  Token-budget batching fixes tokens per micro-batch instead, which
keeps the GPU busy and the memory flat, but then the samples per step follow the data's
lengths.  ``budget_for_samples`` turns "S samples per step" into the budget that gives S
on average for this data: ``S x mean tokens per sample / accumulation steps``, from the
length cache that packing reads anyway.  The learning rate, schedule and epochs of a
recipe then mean what they meant with fixed batches (same samples per step on average,
same number of steps per epoch, up to packing's rounding).
"""
from __future__ import annotations

import math

import numpy as np

from qwenvl.data.batch.length_cache import TOKENS


def budget_for_samples(lengths, samples_per_step: int, accumulation_steps: int = 1) -> tuple[int, float]:
    """``(tokens per micro-batch, mean tokens per sample)`` for ``samples_per_step`` samples per
    optimizer step on average, over ``accumulation_steps`` micro-batches.

    ``lengths``: the (n, 3) length table (``qwenvl.data.batch.length_cache``) or 1-D token counts;
    rows <= 0 (samples that cannot be rendered) are left out.  The budget is at least the
    longest sample, so every sample fits a micro-batch.
    """
    if samples_per_step <= 0 or accumulation_steps <= 0:
        raise ValueError(f"samples_per_step and accumulation_steps must be positive, got {samples_per_step}, "
                         f"{accumulation_steps}")
    table = np.asarray(lengths)
    tokens = table[:, TOKENS] if table.ndim == 2 else table
    tokens = tokens[tokens > 0]
    if tokens.size == 0:
        raise ValueError("no usable sample to size a token budget from")
    mean = float(tokens.mean())
    budget = math.ceil(samples_per_step * mean / accumulation_steps)
    return max(budget, int(tokens.max())), mean
