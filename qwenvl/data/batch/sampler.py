"""Batch samplers that use the length cache: online packing and length / modality grouping.

Both are *batch* samplers (``DataLoader(dataset, batch_sampler=...)``): each item
they yield is the list of dataset indices of one micro-batch.  Both are:

* deterministic per ``(seed, epoch)`` (``set_epoch`` picks the epoch; the Trainer
  calls it), with the same global list of batches on every rank;
* sharded by index: rank ``r`` of ``W`` takes global batches ``r, r + W, ...``.
  With ``rank=None`` the sampler yields every global batch, in that order, for a
  wrapper that shards them itself: accelerate's ``BatchSamplerShard`` (what
  ``accelerator.prepare`` wraps a DataLoader's batch sampler in) hands batch ``i`` to
  process ``i % W``, the same split (tested).  The samplers have no ``batch_size``
  attribute, so accelerate treats their batches as variable-sized;
* exact: every usable item appears exactly once per epoch over all ranks.  The
  number of global batches is made a multiple of ``W`` (all ranks take the same
  number of steps, or DDP would hang) by splitting the batches with the most items
  in two, never by repeating or dropping items.  Only when there are fewer items than
  ranks are batches repeated (logged).

``OnlinePackingBatchSampler`` packs items whose token sum fits ``max_tokens`` (and
patch sum ``max_patches``) with best-fit decreasing; use it with the flattened
collator, one pack per micro-batch.  ``LengthGroupedBatchSampler`` forms batches of
``batch_size`` items of similar length (LLaVA's ``group_by_modality_length`` keeps
text-only and multimodal items in separate batches).  ``make_train_sampler`` picks
one from the training arguments.
"""
from __future__ import annotations

import logging
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from qwenvl.data.batch.length_cache import PATCHES, TOKENS, VISUAL
from qwenvl.data.batch.packing import pack_items
from qwenvl.data.errors import DataError, DataKind

logger = logging.getLogger(__name__)

__all__ = ["OnlinePackingBatchSampler", "LengthGroupedBatchSampler", "make_train_sampler", "balance_for_ranks",
           "epoch_rng"]


def epoch_rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    """The generator of one (seed, epoch): identical on every rank and after a resume."""
    return np.random.default_rng([int(seed), int(epoch), int(stream)])


def _as_table(lengths) -> np.ndarray:
    """(n, 3) int64 [tokens, visual, patches] from a table, or from a 1-D array of token counts."""
    arr = np.asarray(lengths, dtype=np.int64)
    if arr.ndim == 1:
        table = np.zeros((arr.size, 3), dtype=np.int64)
        table[:, TOKENS] = arr
        table[arr < 0] = -1
        return table
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"lengths must be (n,) token counts or an (n, 3) length table, got shape {arr.shape}")
    return arr


def balance_for_ranks(batches: list[list[int]], world_size: int) -> list[list[int]]:
    """Make ``len(batches)`` a multiple of ``world_size`` by splitting the batches with the most items.

    Splitting keeps every item exactly once and only makes batches smaller (still
    within any budget).  Splits are deterministic: the largest batches (ties: the
    first) are halved.  With fewer items than ranks, batches are repeated instead.
    """
    if world_size <= 1 or not batches or len(batches) % world_size == 0:
        return list(batches)
    batches = list(batches)
    need = world_size - len(batches) % world_size
    splittable = sorted((i for i, b in enumerate(batches) if len(b) > 1), key=lambda i: (-len(batches[i]), i))
    extra = []
    for i in splittable[:need]:
        half = len(batches[i]) // 2
        batches[i], tail = batches[i][:half], batches[i][half:]
        extra.append(tail)
    batches.extend(extra)
    short = (world_size - len(batches) % world_size) % world_size
    if short:
        logger.warning("only %d batches for %d ranks: repeating %d of them so every rank takes the same number of "
                       "steps", len(batches), world_size, short)
        batches.extend(batches[i % len(batches)] for i in range(short))
    return batches


class _RankShardedBatchSampler(Sampler[list[int]]):
    """Shared epoch handling and rank sharding; subclasses build the global batches of an epoch."""

    def __init__(self, seed: int, world_size: int, rank: int | None):
        if world_size < 1 or (rank is not None and not 0 <= rank < world_size):
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.seed, self.world_size, self.rank = int(seed), int(world_size), rank
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _build(self, epoch: int) -> list[list[int]]:
        raise NotImplementedError

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """Every rank's batches of ``epoch`` (default: the current one), in global order."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, balance_for_ranks(self._build(epoch), self.world_size))
        return self._cache[1]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches()
        mine = batches if self.rank is None else batches[self.rank::self.world_size]
        for batch in mine:
            yield list(batch)

    def __len__(self) -> int:
        n = len(self.global_batches())
        return n if self.rank is None else n // self.world_size


class OnlinePackingBatchSampler(_RankShardedBatchSampler):
    """Packs of dataset indices whose tokens fit ``max_tokens`` (and patches ``max_patches``).

    ``lengths``: the (n, 3) table of ``dataset_lengths`` (or n token counts).  Items
    with a negative length (cannot be rendered) are left out, as are items over a
    budget (``self.dropped``; with lengths fitted to ``model_max_length`` only the
    patch budget can drop any).  Each epoch packs with best-fit decreasing, equal
    sizes ordered by a seeded random key, and shuffles the packs: the number of packs
    is the same every epoch (it depends only on the sizes), so ``len()`` is stable.
    """

    def __init__(self, lengths, max_tokens: int, max_patches: int | None = None, seed: int = 0,
                 world_size: int = 1, rank: int | None = 0, algorithm: str = "bfd"):
        super().__init__(seed, world_size, rank)
        table = _as_table(lengths)
        self.tokens, self.patches = table[:, TOKENS], table[:, PATCHES]
        self.max_tokens, self.max_patches, self.algorithm = int(max_tokens), max_patches, algorithm
        usable = np.flatnonzero(self.tokens > 0)
        self.bad = np.flatnonzero(self.tokens <= 0)
        over = (self.tokens[usable] > self.max_tokens)
        if max_patches is not None:
            over |= self.patches[usable] > max_patches
        self.dropped = usable[over]
        self.items = usable[~over]
        if self.dropped.size:
            logger.warning("online packing leaves out %d samples over the budget (%d tokens%s)", self.dropped.size,
                           self.max_tokens, "" if max_patches is None else f", {max_patches} patches")
        if not self.items.size:
            raise DataError(f"no sample fits the packing budget of {self.max_tokens} tokens"
                            f"{'' if max_patches is None else f' and {max_patches} patches'}; raise the budget.")

    def _build(self, epoch: int) -> list[list[int]]:
        rng = epoch_rng(self.seed, epoch)
        result = pack_items(self.tokens, self.max_tokens, self.patches, self.max_patches, self.items,
                            self.algorithm, rng=rng)
        order = rng.permutation(len(result.packs))
        return [result.packs[i] for i in order]

    def fill_ratio(self, epoch: int | None = None) -> float:
        """Tokens of the epoch's packs / (packs x max_tokens)."""
        batches = self.global_batches(epoch)
        return float(sum(int(self.tokens[b].sum()) for b in batches)) / (len(batches) * self.max_tokens)


class LengthGroupedBatchSampler(_RankShardedBatchSampler):
    """Batches of ``batch_size`` items of similar length, optionally one modality per batch.

    Per epoch (seeded): the items are shuffled, cut into megabatches of
    ``batch_size * world_size * megabatch_mult`` items, each sorted by tokens
    (longest first) and cut into batches, so the ``world_size`` batches of one step
    hold items of similar length and a micro-batch pads little.  With
    ``group_by_modality`` this is done separately for text-only items (no visual
    tokens) and multimodal ones, as LLaVA's ``group_by_modality_length``; only the
    two groups' last, partial batches may be merged.  The steps (groups of
    ``world_size`` batches) are then shuffled, except that the step holding the
    longest item goes first, so an out-of-memory shows at once.
    """

    def __init__(self, lengths, batch_size: int, seed: int = 0, world_size: int = 1, rank: int | None = 0,
                 group_by_modality: bool = False, megabatch_mult: int = 8, is_multimodal: Sequence[bool] | None = None):
        super().__init__(seed, world_size, rank)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        table = _as_table(lengths)
        self.tokens = table[:, TOKENS]
        # Not named ``batch_size``: accelerate's BatchSamplerShard treats a sampler with that
        # attribute as yielding fixed-size batches, and ours are not (halves, leftovers).
        self.micro_batch_size, self.megabatch_mult = int(batch_size), max(1, int(megabatch_mult))
        self.items = np.flatnonzero(self.tokens > 0)
        self.bad = np.flatnonzero(self.tokens <= 0)
        multimodal = table[:, VISUAL] > 0 if is_multimodal is None else np.asarray(is_multimodal, dtype=bool)
        if group_by_modality:
            self.groups = [self.items[multimodal[self.items]], self.items[~multimodal[self.items]]]
        else:
            self.groups = [self.items]

    def _group_batches(self, items: np.ndarray, rng: np.random.Generator) -> tuple[list[list[int]], list[int]]:
        """Full batches of one group, and the leftover items (fewer than a batch)."""
        items = items[rng.permutation(items.size)]
        mega = self.micro_batch_size * self.world_size * self.megabatch_mult
        batches: list[list[int]] = []
        for start in range(0, items.size, mega):
            chunk = items[start:start + mega]
            chunk = chunk[np.argsort(-self.tokens[chunk], kind="stable")].tolist()
            size = self.micro_batch_size
            batches.extend(chunk[i:i + size] for i in range(0, len(chunk), size))
        leftover = batches.pop() if batches and len(batches[-1]) < self.micro_batch_size else []
        return batches, leftover

    def _build(self, epoch: int) -> list[list[int]]:
        rng = epoch_rng(self.seed, epoch)
        batches, leftovers = [], []
        for group in self.groups:
            full, rest = self._group_batches(group, rng)
            batches.extend(full)
            leftovers.extend(rest)
        # Leftovers stay in group order, so at most one batch mixes the two groups.
        size = self.micro_batch_size
        batches.extend(leftovers[i:i + size] for i in range(0, len(leftovers), size))
        if not batches:
            return []
        batches = balance_for_ranks(batches, self.world_size)
        w = self.world_size
        steps = [batches[i:i + w] for i in range(0, len(batches), w)]
        longest = max(range(len(steps)), key=lambda s: max(int(self.tokens[b].max()) for b in steps[s]))
        rest = [s for s in range(len(steps)) if s != longest]
        order = [longest] + [rest[i] for i in rng.permutation(len(rest))]
        return [batch for s in order for batch in steps[s]]


def make_train_sampler(dataset, lengths, args, world_size: int = 1, rank: int | None = 0, seed: int = 42):
    """The batch sampler the training arguments ask for, or None for the Trainer's default.

    ``lengths``: the (len(dataset), 3) table of ``qwenvl.data.batch.length_cache.dataset_lengths``
    (or its ``(rows, bad)`` result).  ``args`` is read with these attribute names
    (missing ones take the default):

    * ``online_packing`` (False): pack micro-batches up to ``pack_max_tokens``
      (default ``model_max_length``) tokens and ``max_patches_per_pack`` (None)
      patches; ``per_device_train_batch_size`` is then not used (one pack per step
      and rank; use the flattened collator);
    * ``group_by_modality_length`` (False), or ``group_by_length`` /
      ``train_sampling_strategy == "group_by_length"``: length-grouped batches of
      ``per_device_train_batch_size`` (modality-separated for the first);
    * ``bad_sample_policy`` is the dataset's: items whose length row is negative
      cannot be rendered; with ``error`` they stop training here, before the first
      step, with their names; with ``skip`` they are left out of every epoch.
    """
    if isinstance(lengths, tuple):
        lengths = lengths[0]
    table = _as_table(lengths)
    if table.shape[0] != len(dataset):
        raise ValueError(f"lengths has {table.shape[0]} rows for a dataset of {len(dataset)} items")
    online = bool(getattr(args, "online_packing", False))
    by_modality = bool(getattr(args, "group_by_modality_length", False))
    by_length = bool(getattr(args, "group_by_length", False)) or \
        getattr(args, "train_sampling_strategy", None) == "group_by_length"
    if not (online or by_modality or by_length):
        return None
    bad = np.flatnonzero(table[:, TOKENS] <= 0)
    if bad.size and getattr(dataset, "bad_sample_policy", "error") == "error":
        names = "\n  ".join(dataset.origin(int(i)) if hasattr(dataset, "origin") else f"item {int(i)}"
                            for i in bad[:10])
        more = f"\n  ... and {bad.size - 10} more" if bad.size > 10 else ""
        raise DataError(f"{bad.size} samples cannot be rendered (bad media, format or over --model_max_length):\n  "
                        f"{names}{more}\nRun python -m qwenvl.tools.audit with the same flags for every reason, "
                        "fix the data, or pass --bad_sample_policy skip to leave them out.", DataKind.BAD_SAMPLES)
    if bad.size:
        logger.warning("%d samples that cannot be rendered are left out of training (--bad_sample_policy skip)",
                       bad.size)
    if hasattr(dataset, "expect_lengths"):
        # Rendering is checked against the rows planned with; under a budget a longer sample is refused.
        # Token counts alone (a 1-D ``lengths``) leave the visual and patch columns unknown.
        columns = (TOKENS,) if np.ndim(lengths) == 1 else (TOKENS, VISUAL, PATCHES)
        dataset.expect_lengths(table, refuse_longer=online, columns=columns)
    if online:
        max_tokens = getattr(args, "pack_max_tokens", None) or getattr(args, "model_max_length", None)
        if not max_tokens:
            raise ValueError("online packing needs a token budget: set --model_max_length (or pack_max_tokens)")
        return OnlinePackingBatchSampler(table, int(max_tokens), getattr(args, "max_patches_per_pack", None), seed,
                                         world_size, rank)
    return LengthGroupedBatchSampler(table, int(getattr(args, "per_device_train_batch_size", 1)), seed, world_size,
                                     rank, group_by_modality=by_modality)
