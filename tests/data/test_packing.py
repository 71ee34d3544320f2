"""Bin packing under two budgets, and the batch samplers built on it (online packing, length grouping)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig

from qwenvl.data.arguments import DataArguments
from qwenvl.data.batch.collate import FlattenedCollator
from qwenvl.data.batch.length_cache import PATCHES, TOKENS, VISUAL, dataset_lengths
from qwenvl.data.batch.packing import ALGORITHMS, _MaxTree, pack_items, shuffle_packs
from qwenvl.data.batch.sampler import (LengthGroupedBatchSampler, OnlinePackingBatchSampler, balance_for_ranks,
                                       make_train_sampler)
from qwenvl.data.dataset import make_supervised_data_module
from qwenvl.data.errors import DataError
from tests.conftest import copy_demo_annotations, load_processor

REPO = Path(__file__).resolve().parents[2]


def _random_sizes(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 700, n), rng.integers(0, 900, n)


# ------------------------------------------------------------------------ packing

@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("max_patches", [None, 1500])
def test_every_item_once_within_both_budgets(algorithm, max_patches):
    tokens, patches = _random_sizes(3000)
    tokens[:3] = [1025, 5000, 1024]  # two over the budget, one exactly at it
    result = pack_items(tokens, 1024, patches, max_patches, algorithm=algorithm)
    packed = sorted(i for p in result.packs for i in p)
    over = set(np.flatnonzero(tokens > 1024).tolist())
    if max_patches is not None:
        over |= set(np.flatnonzero(patches > max_patches).tolist())
    assert sorted(result.dropped) == sorted(over) and {0, 1} <= set(result.dropped)
    assert packed == sorted(set(range(tokens.size)) - over)  # each kept item exactly once
    assert all(tokens[p].sum() <= 1024 for p in result.packs)
    if max_patches is not None:
        assert all(patches[p].sum() <= max_patches for p in result.packs)
    assert result.tokens_used == sum(result.pack_tokens) == int(tokens[packed].sum())
    assert result.fill_ratio == pytest.approx(result.tokens_used / (len(result.packs) * 1024))
    again = pack_items(tokens, 1024, patches, max_patches, algorithm=algorithm)
    assert again.packs == result.packs  # deterministic


def test_decreasing_fits_beat_next_fit_and_reach_the_bound():
    tokens, _ = _random_sizes(5000, seed=1)
    bound = int(np.ceil(tokens.sum() / 2048))
    fills = {a: pack_items(tokens, 2048, algorithm=a) for a in ALGORITHMS}
    assert len(fills["bfd"].packs) <= bound + 1 and len(fills["ffd"].packs) <= bound + 1
    assert fills["bfd"].fill_ratio > 0.99 and fills["next_fit"].fill_ratio < fills["bfd"].fill_ratio


def _reference(tokens, patches, cap_t, cap_p, best: bool):
    """Plain O(items x packs) best / first fit over the same decreasing order, for comparison."""
    order = sorted(range(len(tokens)), key=lambda i: (-tokens[i], -patches[i], i))
    packs, rem_t, rem_p = [], [], []
    for i in order:
        fits = [k for k in range(len(packs)) if rem_t[k] >= tokens[i] and rem_p[k] >= patches[i]]
        if not fits:
            packs.append([]), rem_t.append(cap_t), rem_p.append(cap_p)
            k = len(packs) - 1
        else:
            k = min(fits, key=lambda k: (rem_t[k], -rem_p[k], k)) if best else fits[0]
        packs[k].append(i)
        rem_t[k] -= tokens[i]
        rem_p[k] -= patches[i]
    return sorted(sorted(p) for p in packs)


@pytest.mark.parametrize("seed", range(5))
def test_best_and_first_fit_equal_a_plain_implementation(seed):
    rng = np.random.default_rng(seed)
    tokens, patches = rng.integers(1, 60, 300).tolist(), rng.integers(0, 80, 300).tolist()
    for best, name in ((True, "bfd"), (False, "ffd")):
        for cap_p in (None, 120):
            got = pack_items(tokens, 100, patches, cap_p, algorithm=name)
            want = _reference(tokens, patches if cap_p else [0] * 300, 100, cap_p or 0, best)
            assert sorted(got.packs) == want, (name, cap_p)


def test_patch_budget_changes_the_choice():
    # Item 2 fits the tighter first pack by tokens, but only the second by patches.
    tokens, patches = [6, 5, 3], [9, 1, 5]
    assert sorted(pack_items(tokens, 10, algorithm="bfd").packs) == [[0, 2], [1]]
    result = pack_items(tokens, 10, patches, 10, algorithm="bfd")
    assert sorted(result.packs) == [[0], [1, 2]]
    assert result.patch_fill_ratio == pytest.approx(15 / 20)


def test_max_tree_first_at_least_matches_a_scan():
    rng = np.random.default_rng(3)
    values = [-1] * 50
    tree = _MaxTree(50)
    for _ in range(2000):
        i, v = int(rng.integers(50)), int(rng.integers(-1, 20))
        values[i] = v
        tree.set(i, v)
        lo, want = int(rng.integers(50)), int(rng.integers(0, 20))
        expected = next((j for j in range(lo, 50) if values[j] >= want), -1)
        assert tree.first_at_least(lo, want) == expected


def test_shuffle_packs_is_seeded_and_keeps_sums_in_step():
    tokens, _ = _random_sizes(500)
    result = pack_items(tokens, 1024)
    a, b, c = shuffle_packs(result, 5), shuffle_packs(result, 5), shuffle_packs(result, 6)
    assert a.packs == b.packs != c.packs and sorted(map(tuple, a.packs)) == sorted(map(tuple, result.packs))
    assert a.pack_tokens == [int(tokens[p].sum()) for p in a.packs]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="algorithm"):
        pack_items([1], 10, algorithm="magic")
    with pytest.raises(ValueError, match="at least 1 token"):
        pack_items([-1, 3], 10)


# ------------------------------------------------------------------------ samplers, on numbers

def _table(n=400, seed=0):
    rng = np.random.default_rng(seed)
    table = np.zeros((n, 3), dtype=np.int64)
    table[:, TOKENS] = rng.integers(20, 400, n)
    table[:, VISUAL] = np.where(rng.random(n) < 0.6, rng.integers(4, 16, n), 0)
    table[:, PATCHES] = table[:, VISUAL] * 4
    return table


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_online_packing_covers_each_item_once_across_ranks(world_size):
    table = _table()
    samplers = [OnlinePackingBatchSampler(table, 1024, 160, seed=7, world_size=world_size, rank=r)
                for r in range(world_size)]
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in samplers]
        assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0])
        items = sorted(i for batches in per_rank for b in batches for i in b)
        assert items == list(range(len(table)))
        for batches in per_rank:
            for b in batches:
                assert table[b, TOKENS].sum() <= 1024 and table[b, PATCHES].sum() <= 160
        # The global list is the same on every rank; rank r holds items r, r + W, ...
        glob = samplers[0].global_batches()
        assert all(s.global_batches() == glob for s in samplers)
        assert per_rank[1 % world_size] == glob[1 % world_size::world_size]
    everything = OnlinePackingBatchSampler(table, 1024, 160, seed=7, world_size=world_size, rank=None)
    assert list(everything) == samplers[0].global_batches(0)


def test_online_packing_is_deterministic_per_seed_and_epoch_with_a_stable_length():
    table = _table(seed=2)
    a = OnlinePackingBatchSampler(table, 800, seed=1)
    b = OnlinePackingBatchSampler(table, 800, seed=1)
    c = OnlinePackingBatchSampler(table, 800, seed=2)
    assert list(a) == list(b) and list(a) != list(c)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and len(a) == len(first)  # reshuffled, same number of steps
    a.set_epoch(0)
    assert list(a) == first
    assert a.fill_ratio() > 0.95


def test_bad_and_oversized_items_are_left_out():
    table = _table(50)
    table[3] = -1  # cannot be rendered
    table[4, TOKENS] = 5000
    sampler = OnlinePackingBatchSampler(table, 1024)
    items = sorted(i for b in sampler for i in b)
    assert 3 not in items and 4 not in items and len(items) == 48
    assert sampler.dropped.tolist() == [4] and sampler.bad.tolist() == [3]


def test_balance_for_ranks_splits_instead_of_repeating():
    batches = [[0, 1, 2, 3], [4], [5, 6], [7, 8, 9]]
    out = balance_for_ranks(batches, 3)
    assert len(out) == 6 and sorted(i for b in out for i in b) == list(range(10))
    assert balance_for_ranks([[0], [1]], 3) == [[0], [1], [0]]  # fewer items than ranks: repeat


@pytest.mark.parametrize("world_size", [1, 2])
def test_length_grouping_separates_modalities_and_groups_lengths(world_size):
    table = _table(500, seed=4)
    samplers = [LengthGroupedBatchSampler(table, 8, seed=3, world_size=world_size, rank=r, group_by_modality=True)
                for r in range(world_size)]
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1
    items = sorted(i for batches in per_rank for b in batches for i in b)
    assert items == list(range(500))
    glob = samplers[0].global_batches()
    mixed = [b for b in glob if len(set((table[b, VISUAL] > 0).tolist())) > 1]
    assert len(mixed) <= 1  # only the two groups' leftovers may share a batch
    # The first step holds the longest item; batches are sorted runs, so little padding.
    assert int(table[:, TOKENS].max()) in [int(table[i, TOKENS]) for b in glob[:world_size] for i in b]
    spread = np.mean([np.ptp(table[b, TOKENS]) for b in glob if len(b) > 1])
    random_spread = np.mean([np.ptp(table[np.random.default_rng(0).choice(500, 8), TOKENS]) for _ in range(50)])
    assert spread < random_spread / 3
    again = LengthGroupedBatchSampler(table, 8, seed=3, world_size=world_size, rank=0, group_by_modality=True)
    assert list(again) == per_rank[0]
    again.set_epoch(1)
    assert list(again) != per_rank[0]


@pytest.mark.parametrize("world_size", [2, 3])
def test_global_samplers_shard_like_accelerate(world_size):
    """With rank=None, accelerate's BatchSamplerShard gives each process what rank=r would yield."""
    accelerate = pytest.importorskip("accelerate.data_loader")
    table = _table(301, seed=5)
    for make in (lambda rank: OnlinePackingBatchSampler(table, 1000, seed=1, world_size=world_size, rank=rank),
                 lambda rank: LengthGroupedBatchSampler(table, 4, seed=1, world_size=world_size, rank=rank,
                                                        group_by_modality=True)):
        everything = make(None)
        for rank in range(world_size):
            shard = accelerate.BatchSamplerShard(everything, num_processes=world_size, process_index=rank,
                                                 split_batches=False, even_batches=True)
            assert list(shard) == list(make(rank)) and len(shard) == len(make(rank))


def test_make_train_sampler_follows_the_arguments_and_the_policy():
    table = _table(30)

    class Items(list):
        bad_sample_policy = "error"

        def origin(self, i):
            return f"dataset 'x', record {i}"

    items = Items(range(30))
    assert make_train_sampler(items, table, SimpleNamespace()) is None
    packing = make_train_sampler(items, table, SimpleNamespace(online_packing=True, model_max_length=512))
    assert isinstance(packing, OnlinePackingBatchSampler) and packing.max_tokens == 512
    grouped = make_train_sampler(items, table, SimpleNamespace(group_by_modality_length=True,
                                                               per_device_train_batch_size=4))
    assert isinstance(grouped, LengthGroupedBatchSampler) and len(grouped.groups) == 2
    strategy = make_train_sampler(items, table, SimpleNamespace(train_sampling_strategy="group_by_length",
                                                                per_device_train_batch_size=4))
    assert isinstance(strategy, LengthGroupedBatchSampler) and len(strategy.groups) == 1
    table[5] = -1
    with pytest.raises(DataError, match="record 5"):
        make_train_sampler(items, table, SimpleNamespace(online_packing=True, model_max_length=512))
    items.bad_sample_policy = "skip"
    skipping = make_train_sampler(items, (table, {5: "broken"}), SimpleNamespace(online_packing=True,
                                                                                 model_max_length=512))
    assert 5 not in [i for b in skipping for i in b]


# ------------------------------------------------------------------------ samplers, end to end

@pytest.fixture(scope="module")
def demo_dataset(tiny_model_dir, tmp_path_factory):
    """A mixture of the demo data (annotation copies in tmp: the length cache lands there)."""
    folder = copy_demo_annotations(tmp_path_factory.mktemp("demo_copy")).parent
    model = tiny_model_dir("qwen2_5_vl")
    args = DataArguments(dataset_use="demo_shapes%10,demo_text%20,demo_multi_image%20,demo_video%50",
                         dataset_dictionary=str(folder / "dict.json"), max_pixels=112 * 112, min_pixels=56 * 56,
                         video_max_pixels=56 * 56, video_min_pixels=28 * 28, data_flatten=True)
    module = make_supervised_data_module(load_processor(model), args, AutoConfig.from_pretrained(model),
                                         model_max_length=512, seed=0)
    return module


def test_online_packing_through_a_dataloader(demo_dataset, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    dataset, collator = demo_dataset["train_dataset"], demo_dataset["data_collator"]
    assert isinstance(collator, FlattenedCollator)
    rows, bad = dataset_lengths(dataset, progress=False)
    assert bad == {}
    args = SimpleNamespace(online_packing=True, model_max_length=512, max_patches_per_pack=600)
    seen = []
    for rank in range(2):
        sampler = make_train_sampler(dataset, rows, args, world_size=2, rank=rank, seed=11)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator)
        for indices, batch in zip(sampler, loader):
            seen.extend(indices)
            assert batch["input_ids"].shape == (1, int(rows[indices, TOKENS].sum()))
            assert batch["input_ids"].shape[1] <= 512
            patches = sum(int(batch[k].shape[0]) for k in ("pixel_values", "pixel_values_videos") if k in batch)
            assert patches == int(rows[indices, PATCHES].sum()) <= 600
            # Each packed sample restarts its text positions at 0: one row per sample boundary.
            assert int((batch["position_ids"][0, 0] == 0).sum()) == len(indices)
            assert torch.all(batch["labels"][batch["labels"] != -100] >= 0)
    assert sorted(seen) == list(range(len(dataset)))


def test_length_grouped_batches_through_a_dataloader(demo_dataset):
    dataset = demo_dataset["train_dataset"]
    rows, _ = dataset_lengths(dataset, progress=False)
    from qwenvl.data.batch.collate import PaddedCollator
    collator = PaddedCollator(dataset.renderer.processor.tokenizer.pad_token_id)
    sampler = make_train_sampler(dataset, rows, SimpleNamespace(group_by_modality_length=True,
                                                                per_device_train_batch_size=4), seed=5)
    seen = []
    for indices, batch in zip(sampler, DataLoader(dataset, batch_sampler=sampler, collate_fn=collator)):
        seen.extend(indices)
        assert batch["input_ids"].shape == (len(indices), int(rows[indices, TOKENS].max()))
    assert sorted(seen) == list(range(len(dataset)))
