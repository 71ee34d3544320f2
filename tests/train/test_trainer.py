"""A few real optimizer steps with QwenVLTrainer on tiny models."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

from qwenvl.train.arguments import ModelArguments
from qwenvl.train.model import component_of, load_model, prepare_model
from qwenvl.train.trainer import QwenVLTrainer
from tests.conftest import load_processor as load_released_processor

from .conftest import IMAGE_SIZE, ChatCollator, conversations, load_processor, snapshot


class ChatDataset(torch.utils.data.Dataset):
    """Conversations, plus the ``log_metrics`` hook the trainer adds to its logs."""

    def __init__(self, chats):
        self.chats = chats

    def __len__(self):
        return len(self.chats)

    def __getitem__(self, i):
        return self.chats[i]

    def log_metrics(self):
        return {"skipped_samples": 0}


def _train(path, training_args, model_args, n=8):
    processor = load_processor(path)
    model = prepare_model(load_model(model_args, training_args), model_args, training_args)
    before = snapshot(model)
    trainer = QwenVLTrainer(model=model, args=training_args, processing_class=processor,
                            train_dataset=ChatDataset(conversations(n)), data_collator=ChatCollator(processor))
    trainer.train()
    return trainer, model, before


def _assert_only_trainable_changed(model, before):
    changed, frozen_changed, unchanged = [], [], []
    for name, param in model.named_parameters():
        same = torch.equal(before[name], param.detach())
        if param.requires_grad and same:
            unchanged.append(name)
        elif not param.requires_grad and not same:
            frozen_changed.append(name)
        elif param.requires_grad:
            changed.append(name)
    assert changed and not unchanged, f"trainable parameters that did not change: {unchanged}"
    assert not frozen_changed, f"frozen parameters that changed: {frozen_changed}"


@pytest.mark.parametrize("model_type,llm,mlp,vision", [
    ("qwen2_5_vl", False, True, True),
    ("qwen3_vl", False, True, True),
    ("qwen3_vl", True, False, False),
    ("qwen3_5", False, True, True),
    ("qwen3_5_moe", True, False, False),
])
def test_frozen_stay_identical_and_trainable_all_change(tiny_model_dir, make_training_args,
                                                        model_type, llm, mlp, vision):
    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir(model_type)),
                                tune_mm_llm=llm, tune_mm_mlp=mlp, tune_mm_vision=vision)
    training_args = make_training_args(mm_projector_lr=5e-3 if mlp else None, vision_tower_lr=2e-3 if vision else None,
                                       max_steps=2)
    trainer, model, before = _train(model_args.model_name_or_path, training_args, model_args, n=4)
    _assert_only_trainable_changed(model, before)
    assert {component_of(n) for n, p in model.named_parameters() if p.requires_grad} == \
        {c for c, on in (("llm", llm), ("merger", mlp), ("vision", vision)) if on}

    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2
    for entry in logs:
        assert entry["tokens_per_second"] > 0 and entry["visual_tokens_per_second"] > 0
        assert entry["text_tokens_per_second"] > 0 and entry["skipped_samples"] == 0
        if mlp and vision:
            # every group follows the same schedule, scaled to its own peak rate
            assert entry["lr/merger"] / 5e-3 == pytest.approx(entry["lr/vision"] / 2e-3)
            assert "lr/llm" not in entry
        else:
            assert entry["lr/llm"] == entry["learning_rate"]


@pytest.mark.slow
def test_checkpoints_carry_the_processor_and_load_with_auto_classes(tiny_model_dir, make_training_args):
    path = tiny_model_dir("qwen2_5_vl")
    model_args = ModelArguments(model_name_or_path=str(path), tune_mm_llm=True, tune_mm_mlp=True)
    training_args = make_training_args(save_strategy="steps", save_steps=2, max_steps=2)
    trainer, model, _ = _train(path, training_args, model_args, n=4)
    trainer.save_model(training_args.output_dir)
    original = load_released_processor(path)
    for folder in (f"{training_args.output_dir}/checkpoint-2", training_args.output_dir):
        processor = load_released_processor(folder)
        assert processor.image_processor.size == IMAGE_SIZE  # the training settings, not the base ones
        assert processor.chat_template == original.chat_template
        loaded = AutoModelForImageTextToText.from_pretrained(folder)
        # The released class: the trained model may be its training subclass (same name).
        assert type(loaded).__name__ == type(model).__name__ and isinstance(model, type(loaded))
        assert loaded.config.text_config.use_cache is True  # for inference
        for name, param in loaded.named_parameters():
            assert torch.equal(param, dict(model.named_parameters())[name].detach()), name
    assert model.config.text_config.use_cache is False  # training continues without a cache
    assert json.loads(open(f"{training_args.output_dir}/checkpoint-2/trainer_state.json").read())["global_step"] == 2


@pytest.mark.slow
def test_gradient_checkpointing_with_frozen_embeddings(tiny_model_dir, make_training_args):
    """LoRA leaves the embeddings frozen; reentrant checkpointing still reaches every adapter."""
    path = tiny_model_dir("qwen2_5_vl")
    model_args = ModelArguments(model_name_or_path=str(path), tune_mm_llm=True)
    training_args = make_training_args(lora_enable=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                                       gradient_checkpointing=True,
                                       gradient_checkpointing_kwargs={"use_reentrant": True})
    _, model, before = _train(path, training_args, model_args)
    assert not model.get_input_embeddings().weight.requires_grad
    assert model.base_model.model.model.language_model.is_activation_checkpointing
    _assert_only_trainable_changed(model, before)


@pytest.mark.slow
def test_bf16_autocast_on_cpu_trains_float32_copies(tiny_model_dir, make_training_args):
    path = tiny_model_dir("qwen3_vl")
    model_args = ModelArguments(model_name_or_path=str(path), tune_mm_mlp=True, tune_mm_vision=True)
    training_args = make_training_args(bf16=True, max_steps=2)
    _, model, before = _train(path, training_args, model_args, n=4)
    _assert_only_trainable_changed(model, before)
    assert all(p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16) for p in model.parameters())
