"""End to end through train_qwen.py on every family, on a mix of image, multi-image, video and
text-only samples: the loss falls, frozen weights come back bit-identical, trainable ones all move,
and the output loads with transformers' Auto classes and generates."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

from qwenvl.train.model import component_of
from tests.conftest import load_processor

# How samples reach the model: padded rows, one flattened row per batch, or online packing
# (token-budget micro-batches, flattened).
BATCHING = {"padded": ["--data_flatten", "False"], "flattened": ["--data_flatten", "True"],
            "packed": ["--data_flatten", "True", "--max_tokens_per_batch", "1024"]}
CASES = [("qwen2_vl", "flattened"), ("qwen2_5_vl", "flattened"), ("qwen2_5_vl", "padded"), ("qwen3_vl", "flattened"),
         ("qwen3_vl", "padded"), ("qwen3_vl_moe", "flattened"),
         # Qwen3.5: the Gated DeltaNet layers carry state along the row, so flattened and packed rows
         # train through the boundary-aware layers (qwenvl/train/linear_attention.py).
         ("qwen3_5", "padded"), ("qwen3_5", "flattened"), ("qwen3_5", "packed"), ("qwen3_5_moe", "flattened")]


@pytest.mark.slow
@pytest.mark.parametrize("model_type,batching", CASES)
def test_mixed_data_training(tiny_model_dir, tmp_path, model_type, batching):
    from qwenvl.train.train_qwen import train

    path = tiny_model_dir(model_type)
    out = tmp_path / "out"
    train(["--model_name_or_path", str(path), "--output_dir", str(out),
           "--dataset_use", "demo_shapes%6,demo_multi_image%15,demo_video%40,demo_text%10",
           "--tune_mm_llm", "True", "--tune_mm_mlp", "True", "--tune_mm_vision", "False",
           *BATCHING[batching], "--per_device_train_batch_size", "4", "--max_steps", "8",
           "--learning_rate", "3e-3", "--lr_scheduler_type", "constant", "--logging_steps", "1",
           "--max_pixels", str(112 * 112), "--min_pixels", str(56 * 56), "--video_max_pixels", str(56 * 56),
           "--video_min_pixels", str(28 * 28), "--video_max_frames", "4", "--video_min_frames", "2",
           "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "0", "--seed", "1"])

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5  # it learns

    start = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).state_dict()
    end = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).state_dict()
    unchanged, frozen_moved = [], []
    for name, before in start.items():
        same = torch.equal(before, end[name])
        if component_of(name) == "vision":
            if not same:
                frozen_moved.append(name)
        elif same:
            unchanged.append(name)
    assert not frozen_moved, f"frozen vision weights changed: {frozen_moved[:5]}"
    assert not unchanged, f"trainable weights that did not change: {unchanged[:5]}"

    # The output is a plain transformers checkpoint: the Auto classes load it and it generates.
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    processor = load_processor(out)
    question = [{"role": "user", "content": [{"type": "image", "image": _red_image()},
                                             {"type": "text", "text": "What colour is the shape?"}]}]
    inputs = processor.apply_chat_template(question, tokenize=True, add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def _red_image():
    from PIL import Image

    return Image.new("RGB", (56, 56), (220, 30, 30))
