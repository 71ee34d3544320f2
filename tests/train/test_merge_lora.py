"""LoRA training, then merge_lora, then a plain reload with the Auto classes."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from qwenvl.tools.merge_lora import main as merge_main
from qwenvl.tools.merge_lora import merge_lora
from qwenvl.train.arguments import DEFAULT_LORA_TARGETS, ModelArguments
from qwenvl.train.model import load_model, prepare_model
from qwenvl.train.trainer import QwenVLTrainer
from tests.conftest import load_processor as load_released_processor

from .conftest import IMAGE_SIZE, ChatCollator, conversations, load_processor, snapshot


# Qwen3.5: the default targets put adapters on the Gated DeltaNet projections too; Qwen3.5 here
# with some of them named explicitly, Qwen3.5-MoE with the defaults (attention, linear attention,
# the shared expert).
LINEAR_ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj"]


@pytest.mark.slow
@pytest.mark.parametrize("model_type,targets", [("qwen2_5_vl", None), ("qwen3_vl", None),
                                                ("qwen3_5", LINEAR_ATTENTION_TARGETS), ("qwen3_5_moe", None)])
def test_lora_train_merge_and_reload(tiny_model_dir, make_training_args, tmp_path, model_type, targets):
    path = tiny_model_dir(model_type)
    model_args = ModelArguments(model_name_or_path=str(path), tune_mm_llm=True, tune_mm_mlp=True)
    training_args = make_training_args(lora_enable=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, max_steps=2,
                                       save_strategy="steps", save_steps=2, learning_rate=5e-3,
                                       lora_target_modules=targets or list(DEFAULT_LORA_TARGETS))
    processor = load_processor(path)
    model = prepare_model(load_model(model_args, training_args), model_args, training_args)
    before = snapshot(model)
    collator = ChatCollator(processor)
    QwenVLTrainer(model=model, args=training_args, processing_class=processor, train_dataset=conversations(4),
                  data_collator=collator).train()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    for target in targets or []:  # every named projection got an adapter
        assert any(f".{target}.lora_A" in n for n in trained), target
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in trained)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n not in trained)

    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "adapter_config.json").is_file() and (checkpoint / "chat_template.jinja").is_file()
    merged_dir = merge_lora(checkpoint, tmp_path / "merged")
    assert (merged_dir / "model.safetensors").is_file()

    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    assert type(merged).__name__ == type(model.get_base_model()).__name__
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    merged_processor = load_released_processor(merged_dir)
    assert merged_processor.image_processor.size == IMAGE_SIZE
    assert merged_processor.chat_template == processor.chat_template

    batch = collator(conversations(2, seed=5))
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        got = merged(**batch).logits
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)
    # and it is not simply the base model
    base = AutoModelForImageTextToText.from_pretrained(path).eval()
    with torch.no_grad():
        assert (base(**batch).logits - got).abs().max() > 1e-3


def test_merge_lora_refuses_what_it_cannot_merge(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        merge_main(["--checkpoint", str(tiny_model_dir("qwen2_5_vl")), "--output", str(tmp_path / "m")])
    assert exit_info.value.code == 2
    assert "full model checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        merge_main(["--checkpoint", str(tmp_path), "--output", str(tmp_path / "m")])
    assert "no adapter_config.json" in capsys.readouterr().err
