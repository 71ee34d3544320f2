"""Tiny checkpoints load like the released ones: Auto classes, real token ids, real templates."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from qwenvl.tools.make_tiny_model import model_class
from tests.conftest import FAMILIES

# The released Qwen2-VL / Qwen2.5-VL / Qwen3-VL tokenizers' ids (their tokenizer_config.json):
# the specification these checkpoints must match, so written out here on purpose.
RELEASED_IDS = {"<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                "<|image_pad|>": 151655, "<|video_pad|>": 151656}

# What the released chat templates render for one image question and its answer.
RENDERED = {
    "qwen2": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
              "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
              "<|im_start|>assistant\nred<|im_end|>\n"),
    "qwen3": ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
              "<|im_start|>assistant\nred<|im_end|>\n"),
}
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_tiny_checkpoint_loads_like_the_released_one(tiny_model_dir, model_type):
    path = tiny_model_dir(model_type)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "processor_config.json"):
        assert (path / name).is_file(), name
    processor = AutoProcessor.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == model_type
    assert type(AutoModelForImageTextToText.from_pretrained(path)) is model_class(model_type)
    model = model_class(model_type).from_pretrained(path)

    tokenizer = processor.tokenizer
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in RELEASED_IDS} == RELEASED_IDS
    assert config.text_config.vocab_size >= len(tokenizer)  # every id has an embedding row
    assert config.image_token_id == RELEASED_IDS["<|image_pad|>"]
    assert config.video_token_id == RELEASED_IDS["<|video_pad|>"]
    patch = 16 if model_type.startswith("qwen3") else 14
    assert config.vision_config.patch_size == processor.image_processor.patch_size == patch
    assert processor.image_processor.merge_size == 2 and processor.image_processor.temporal_patch_size == 2

    family = "qwen3" if model_type.startswith("qwen3") else "qwen2"
    assert processor.apply_chat_template(MESSAGES, tokenize=False) == RENDERED[family]
    video = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Moving?"}]}]
    assert "<|vision_start|><|video_pad|><|vision_end|>Moving?<|im_end|>\n<|im_start|>assistant\n" in \
        processor.apply_chat_template(video, tokenize=False, add_generation_prompt=True)

    inline = [{"role": m["role"], "content": [dict(p, image=Image.new("RGB", (56, 56), (200, 0, 0)))
                                              if p["type"] == "image" else p for p in m["content"]]}
              for m in MESSAGES]
    batch = processor.apply_chat_template(inline, tokenize=True, return_dict=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("model.visual") for n in grads) and any("language_model" in n for n in grads)


def test_qwen2_families_do_not_know_qwen3_only_tokens(tiny_model_dir):
    """Qwen2.5-VL's release stops its added tokens at <|file_sep|>; <think> is ordinary text there."""
    q25 = AutoProcessor.from_pretrained(tiny_model_dir("qwen2_5_vl")).tokenizer
    q3 = AutoProcessor.from_pretrained(tiny_model_dir("qwen3_vl")).tokenizer
    assert len(q3("<think>", add_special_tokens=False)["input_ids"]) == 1
    assert len(q25("<think>", add_special_tokens=False)["input_ids"]) > 1
    saved = json.loads((tiny_model_dir("qwen2_5_vl") / "tokenizer_config.json").read_text())
    assert "<|im_end|>" == saved["eos_token"]
