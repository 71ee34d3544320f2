"""Padded and flattened batches of the same samples give the same loss and gradients."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText

from qwenvl.data.batch.collate import FlattenedCollator, PaddedCollator
from qwenvl.data.catalog.formats import Conversation
from qwenvl.data.render.sample import SampleRenderer
from tests.conftest import DENSE_FAMILIES, load_processor


def _samples(processor, config):
    renderer = SampleRenderer(processor, config)
    img = lambda w, h, c: Image.new("RGB", (w, h), c)  # noqa: E731
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": img(84, 56, (200, 10, 10))},
                                      {"type": "text", "text": "Colour?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "red, a warm colour"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "What is 7 times 6?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "42"}]},
         {"role": "user", "content": [{"type": "text", "text": "And plus one?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "43"}]}],
        [{"role": "user", "content": [{"type": "image", "image": img(56, 112, (10, 10, 200))},
                                      {"type": "image", "image": img(112, 56, (10, 200, 10))},
                                      {"type": "text", "text": "Same colour?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "no"}]}],
    ]
    return [renderer.render(Conversation(messages=c, origin=f"sample {i}")) for i, c in enumerate(conversations)]


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", DENSE_FAMILIES)
def test_flattened_batch_equals_padded_batch(tiny_model_dir, model_type):
    path = tiny_model_dir(model_type)
    processor = load_processor(path)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    samples = _samples(processor, config)

    padded = PaddedCollator(processor.tokenizer.pad_token_id)(samples)
    flat = FlattenedCollator()(samples)
    assert padded["input_ids"].shape[0] == 3 and flat["input_ids"].shape[0] == 1
    assert flat["position_ids"].shape == (4, 1, sum(s["input_ids"].shape[0] for s in samples))
    assert "attention_mask" not in flat

    # The padded batch is the reference only if padding changes nothing: the mean loss over
    # trained tokens must equal the token-weighted mean of the samples run one by one.
    loss_pad, grads_pad = _loss_and_grads(model, padded)
    loss_flat, grads_flat = _loss_and_grads(model, flat)
    per_sample = [(_loss_and_grads(model, PaddedCollator(0)([s]))[0], int((s["labels"][1:] != -100).sum()))
                  for s in samples]
    weighted = sum(l * n for l, n in per_sample) / sum(n for _, n in per_sample)
    torch.testing.assert_close(loss_pad, weighted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_flat, loss_pad, rtol=1e-5, atol=1e-5)

    assert grads_pad.keys() == grads_flat.keys()
    assert any(n.startswith("model.visual") for n in grads_pad)
    assert any("language_model" in n for n in grads_pad)
    for name in grads_pad:
        torch.testing.assert_close(grads_flat[name], grads_pad[name], rtol=1e-5, atol=1e-5, msg=name)


def test_flattened_positions_restart_per_sample(tiny_model_dir):
    path = tiny_model_dir("qwen2_5_vl")
    processor = load_processor(path)
    samples = _samples(processor, AutoConfig.from_pretrained(path))
    flat = FlattenedCollator()([samples[0], None, {"pack": samples[1:]}])  # None = a skipped sample
    text_row = flat["position_ids"][0, 0]
    starts = (text_row == 0).nonzero().flatten().tolist()
    lengths = [s["input_ids"].shape[0] for s in samples]
    assert starts == [0, lengths[0], lengths[0] + lengths[1]]
    torch.testing.assert_close(flat["position_ids"][1:, 0, :lengths[0]], samples[0]["position_ids"])
    assert torch.equal(flat["image_grid_thw"], torch.cat([samples[0]["image_grid_thw"], samples[2]["image_grid_thw"]]))
