"""Training checks rendered samples against the length cache, and the cache key sees what changes a count."""
from __future__ import annotations

import gc
import logging
from types import SimpleNamespace

import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from torch.utils.data import DataLoader
from transformers import AutoConfig, PreTrainedTokenizerFast

from qwenvl.data.arguments import DataArguments
from qwenvl.data.batch.count import TokenCounter
from qwenvl.data.batch.length_cache import TOKENS, dataset_lengths
from qwenvl.data.batch.length_key import lengths_key, tokenizer_hash
from qwenvl.data.batch.sampler import make_train_sampler
from qwenvl.data.catalog.registry import load_dictionary
from qwenvl.data.dataset import make_supervised_data_module
from qwenvl.data.errors import DataError, DataKind
from qwenvl.data.media.video import video_settings_from
from qwenvl.data.render.processor_settings import configure_processor
from tests.conftest import copy_demo_annotations, load_processor

BUDGET = 512


def _module(tiny_model_dir, folder, policy: str):
    model = tiny_model_dir("qwen2_5_vl")
    args = DataArguments(dataset_use="demo_shapes%10,demo_text%20,demo_multi_image%20",
                         dataset_dictionary=str(folder / "dict.json"), max_pixels=112 * 112, min_pixels=56 * 56,
                         data_flatten=True, bad_sample_policy=policy)
    return make_supervised_data_module(load_processor(model), args, AutoConfig.from_pretrained(model),
                                       model_max_length=BUDGET, seed=0)


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    return copy_demo_annotations(tmp_path_factory.mktemp("demo_copy")).parent


def _stale(rows: np.ndarray) -> np.ndarray:
    """A length cache that says every other sample is 1 token long: the packer fills packs with them."""
    stale = rows.copy()
    stale[::2, TOKENS] = 1
    return stale


def test_a_sample_longer_than_its_cached_row_never_packs_over_the_budget(tiny_model_dir, demo_folder, caplog):
    module = _module(tiny_model_dir, demo_folder, "skip")
    dataset, collator = module["train_dataset"], module["data_collator"]
    rows, bad = dataset_lengths(dataset, progress=False)
    assert bad == {}
    stale = _stale(rows)
    args = SimpleNamespace(online_packing=True, model_max_length=BUDGET)
    sampler = make_train_sampler(dataset, stale, args, seed=3)
    packs = list(sampler)
    # The setup matters: by the real lengths, some packs planned with the stale rows are over the budget.
    assert max(int(rows[p, TOKENS].sum()) for p in packs) > BUDGET
    with caplog.at_level(logging.WARNING, logger="qwenvl.data.batch.length_check"):
        lengths = [int(batch["input_ids"].shape[1])
                   for batch in DataLoader(dataset, batch_sampler=sampler, collate_fn=collator)]
    assert max(lengths) <= BUDGET
    mismatched = len(range(0, len(dataset), 2))
    assert sum(dataset.length_check.mismatches.values()) >= mismatched
    # One warning per dataset (three here) for the first mismatch, with the count and the fix.
    warnings = [r.getMessage() for r in caplog.records if r.name == "qwenvl.data.batch.length_check"]
    firsts = [w for w in warnings if "1 sample(s) so far" in w]
    assert sorted(w.split("'")[1] for w in firsts) == sorted(dataset.length_check.mismatches)
    assert all("qwenvl.tools.audit" in w for w in warnings)
    assert len(warnings) < sum(dataset.length_check.mismatches.values())  # not one per sample
    # The refused samples went through the skip policy: counted and named, not dropped silently.
    assert dataset.skip_log.counts.get(DataKind.STALE_LENGTH.value, 0) >= 1


def test_with_the_error_policy_a_longer_sample_stops_the_run_with_the_fix(tiny_model_dir, demo_folder):
    dataset = _module(tiny_model_dir, demo_folder, "error")["train_dataset"]
    rows, _ = dataset_lengths(dataset, progress=False)
    make_train_sampler(dataset, _stale(rows), SimpleNamespace(online_packing=True, model_max_length=BUDGET))
    with pytest.raises(DataError, match="longer than the length cache says") as info:
        dataset[0]
    assert info.value.kind is DataKind.STALE_LENGTH and "qwenvl.tools.audit" in str(info.value)
    dataset[1]  # its row is right: no complaint


def test_without_a_budget_a_mismatch_is_counted_and_warned_not_refused(tiny_model_dir, demo_folder, caplog):
    dataset = _module(tiny_model_dir, demo_folder, "error")["train_dataset"]
    rows, _ = dataset_lengths(dataset, progress=False)
    make_train_sampler(dataset, _stale(rows), SimpleNamespace(group_by_length=True, per_device_train_batch_size=2))
    with caplog.at_level(logging.WARNING, logger="qwenvl.data.batch.length_check"):
        for i in (0, 2, 4):
            dataset[i]
    assert sum(dataset.length_check.mismatches.values()) == 3
    assert not dataset.length_check.refuse_longer


def test_the_cache_key_changes_when_a_video_decoder_version_changes(tiny_model_dir, demo_folder, tmp_path,
                                                                     monkeypatch):
    processor = load_processor(tiny_model_dir("qwen2_5_vl"))
    args = DataArguments(dataset_use="demo_video", dataset_dictionary=str(demo_folder / "dict.json"))
    configure_processor(processor, args)
    counter = TokenCounter(processor, video_settings_from(args, processor))
    spec = load_dictionary(args.dataset_dictionary)["demo_video"]
    before, meta = lengths_key(spec, counter)
    # Another decord on the path: an installed distribution of another version, found first.
    dist = tmp_path / "site" / "decord-99.0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: decord\nVersion: 99.0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    after, _ = lengths_key(spec, counter)
    assert after != before
    assert lengths_key(spec, counter)[0] == after  # and stays put while nothing changes


def _word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({w: i for i, w in enumerate(words)},
                                                                        unk_token=words[0])))


def test_a_reused_object_id_never_returns_another_tokenizers_hash():
    hashes, ids = [], []
    for k in range(40):
        tokenizer = _word_tokenizer(["<unk>", f"word{k}"])  # 40 different vocabularies
        ids.append(id(tokenizer))
        hashes.append(tokenizer_hash(tokenizer))
        assert tokenizer_hash(tokenizer) == hashes[-1]  # cached for the live object
        del tokenizer
        gc.collect()
    assert len(set(ids)) < len(ids), "no id was reused: the test did not exercise reuse"
    assert len(set(hashes)) == len(hashes)
