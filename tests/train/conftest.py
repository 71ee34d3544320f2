"""Fixtures of the training tests: tiny checkpoints (from tests/conftest.py), batches made by
the processor itself, and small TrainingArguments."""
from __future__ import annotations

import random
import shutil
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl.train.arguments import TrainingArguments
from tests.conftest import load_processor as load_released_processor

# Small images keep a forward+backward well under a second: at most 64x64 pixels each.
IMAGE_SIZE = {"shortest_edge": 32 * 32, "longest_edge": 64 * 64}


@pytest.fixture(scope="session")
def untied_model_dir(tiny_model_dir, tmp_path_factory):
    """A tiny Qwen2.5-VL with its own lm_head (untied, as the released 7B)."""
    from transformers import AutoConfig

    from qwenvl.tools.make_tiny_model import model_class

    src = tiny_model_dir("qwen2_5_vl")
    out = tmp_path_factory.mktemp("untied") / "qwen2_5_vl_untied"
    shutil.copytree(src, out)
    config = AutoConfig.from_pretrained(src)
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    model_class("qwen2_5_vl")(config).save_pretrained(out)
    return out


def load_processor(path):
    """The checkpoint's processor with small image bounds (what --max/min_pixels would set)."""

    processor = load_released_processor(path)
    processor.image_processor.size = dict(IMAGE_SIZE)
    return processor


def conversations(n: int, seed: int = 0, image_every: int = 1) -> list[list[dict]]:
    """``n`` short chats; every ``image_every``-th one has a random 64x64 image."""
    rng = random.Random(seed)
    chats = []
    for i in range(n):
        content = []
        if image_every and i % image_every == 0:
            pixels = np.random.default_rng(seed * 1000 + i).integers(0, 255, (64, 64, 3), dtype=np.uint8)
            content.append({"type": "image", "image": Image.fromarray(pixels)})
        content.append({"type": "text", "text": f"What is number {rng.randint(0, 99)}?"})
        answer = " ".join(rng.choice(["red", "green", "blue", "square", "circle"]) for _ in range(rng.randint(1, 6)))
        chats.append([{"role": "user", "content": content},
                      {"role": "assistant", "content": [{"type": "text", "text": answer}]}])
    return chats


class ChatCollator:
    """Conversations -> a padded batch through the processor; every real token is trained."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, chats):
        batch = self.processor.apply_chat_template(list(chats), tokenize=True, return_dict=True,
                                                   return_tensors="pt", processor_kwargs={"padding": True})
        batch = dict(batch)
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
        return batch


@pytest.fixture
def make_training_args(tmp_path):
    """make_training_args(**overrides) -> TrainingArguments for a few CPU steps in tmp_path."""

    def make(**overrides):
        values = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2,
                      learning_rate=1e-3, report_to="none", logging_steps=1, save_strategy="no", use_cpu=True,
                      dataloader_num_workers=0, seed=0, disable_tqdm=True)
        values.update(overrides)
        return TrainingArguments(**values)

    return make


def snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of every parameter, by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
