"""The public steps of a training run (qwenvl/train/steps.py), on tiny models and the demo data."""
from __future__ import annotations

import pytest
import transformers
from transformers import AutoConfig, TrainerCallback

from qwenvl.data.arguments import DataArguments
from qwenvl.data.batch.length_cache import TOKENS, dataset_lengths
from qwenvl.data.batch.sampler import OnlinePackingBatchSampler
from qwenvl.data.dataset import make_supervised_data_module
from qwenvl.train.arguments import parse_args
from qwenvl.train.model import load_model
from qwenvl.train.steps import build_trainer, model_class_for_run, train_batch_sampler, uses_zero3
from qwenvl.train.trainer import QwenVLTrainer
from tests.conftest import copy_demo_annotations, load_processor


def _args(path, out, *flags):
    return parse_args(["--model_name_or_path", str(path), "--tune_mm_llm", "True", "--use_cpu", "True",
                       "--output_dir", str(out), *flags])


@pytest.mark.parametrize("loss_kernel", ["auto", "model"])
def test_model_class_for_run_is_the_class_load_model_builds(tiny_model_dir, tmp_path, loss_kernel):
    path = tiny_model_dir("qwen2_5_vl")
    model_args, _, training_args, _ = _args(path, tmp_path, "--tune_mm_mlp", "True", "--loss_kernel", loss_kernel)
    cls = model_class_for_run(AutoConfig.from_pretrained(path), model_args, training_args)
    assert not uses_zero3(training_args)
    if loss_kernel == "model":  # one process, plain loss: the family's own class, unchanged
        assert cls is transformers.Qwen2_5_VLForConditionalGeneration
    else:  # the fused-loss training subclass of the family's class
        assert cls is not transformers.Qwen2_5_VLForConditionalGeneration and cls.fused_loss
        assert issubclass(cls, transformers.Qwen2_5_VLForConditionalGeneration)
    assert type(load_model(model_args, training_args)) is cls


def test_model_class_for_run_of_moe_trains_the_router_loss(tmp_path):
    from tests.train.tiny_qwen35 import tiny_model

    tiny_model("qwen3_5_moe").save_pretrained(tmp_path / "moe")
    model_args, _, training_args, _ = _args(tmp_path / "moe", tmp_path / "out", "--loss_kernel", "model")
    config = AutoConfig.from_pretrained(tmp_path / "moe")
    cls = model_class_for_run(config, model_args, training_args)
    assert cls.router_aux_loss and issubclass(cls, transformers.Qwen3_5MoeForConditionalGeneration)
    assert type(load_model(model_args, training_args)) is cls


@pytest.fixture(scope="module")
def demo(tiny_model_dir, tmp_path_factory):
    folder = copy_demo_annotations(tmp_path_factory.mktemp("demo_copy")).parent
    path = tiny_model_dir("qwen2_5_vl")
    processor = load_processor(path)
    args = DataArguments(dataset_use="demo_shapes%10,demo_text%20", dataset_dictionary=str(folder / "dict.json"),
                         max_pixels=112 * 112, min_pixels=56 * 56, data_flatten=True)
    module = make_supervised_data_module(processor, args, AutoConfig.from_pretrained(path), model_max_length=512,
                                         seed=0)
    return path, processor, module


def test_train_batch_sampler_is_none_without_packing_or_grouping(demo, tmp_path):
    path, _, module = demo
    _, _, training_args, _ = _args(path, tmp_path)
    called = []
    assert train_batch_sampler(module["train_dataset"], training_args, check_cache=called.append) is None
    assert called == []  # no length cache needed, none checked


def test_train_batch_sampler_packs_to_the_token_budget(demo, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path, _, module = demo
    dataset = module["train_dataset"]
    _, _, training_args, _ = _args(path, tmp_path / "out", "--data_flatten", "True",
                                   "--max_tokens_per_batch", "300", "--model_max_length", "512")
    called = []
    sampler = train_batch_sampler(dataset, training_args, check_cache=called.append)
    assert called == [dataset] and isinstance(sampler, OnlinePackingBatchSampler)
    rows, _ = dataset_lengths(dataset, progress=False)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(dataset)))  # each item once
    assert all(rows[b, TOKENS].sum() <= 300 for b in batches)
    assert any(len(b) > 1 for b in batches)  # it packs


def test_build_trainer_wires_the_run(demo, tmp_path):
    path, processor, module = demo
    model_args, _, training_args, _ = _args(path, tmp_path, "--data_flatten", "True")

    class Marker(TrainerCallback):
        pass

    class MyTrainer(QwenVLTrainer):
        pass

    model = load_model(model_args, training_args)
    sampler = [[0, 1], [2]]
    trainer = build_trainer(model, training_args, processor, module, sampler, trainer_class=MyTrainer,
                            callbacks=[Marker()])
    assert type(trainer) is MyTrainer and trainer.model is model and trainer.processing_class is processor
    assert trainer.train_batch_sampler is sampler
    assert trainer.train_dataset is module["train_dataset"] and trainer.data_collator is module["data_collator"]
    assert any(isinstance(c, Marker) for c in trainer.callback_handler.callbacks)
    assert type(build_trainer(model, training_args, processor, module)) is QwenVLTrainer
