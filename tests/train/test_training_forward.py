"""The training subclass: fused loss equal to the released one, dummy vision calls, and the
per-token normalisation of a whole optimizer step."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from qwenvl.data.batch.collate import FlattenedCollator, PaddedCollator
from qwenvl.data.catalog.formats import Conversation
from qwenvl.data.render.sample import SampleRenderer
from qwenvl.tools.make_tiny_model import model_class
from qwenvl.train.fused_loss import with_training_forward
from tests.conftest import copy_demo_annotations
from tests.train.conftest import conversations, load_processor


def _batch(path, n=4, image_every=2, flatten=False):
    processor = load_processor(path)
    renderer = SampleRenderer(processor, AutoConfig.from_pretrained(path))
    samples = [renderer.render(Conversation(messages=c, origin=f"chat {i}"))
               for i, c in enumerate(conversations(n, image_every=image_every))]
    return (FlattenedCollator() if flatten else PaddedCollator(processor.tokenizer.pad_token_id))(samples)


def _grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_fused_loss_equals_the_released_loss_and_saves_as_the_released_class(tiny_model_dir, model_type, tmp_path):
    path = tiny_model_dir(model_type)
    released = model_class(model_type).from_pretrained(path, dtype=torch.float32).train()
    fused = with_training_forward(model_class(model_type), fused_loss=True).from_pretrained(
        path, dtype=torch.float32).train()
    batch = _batch(path, flatten=True)
    loss_ref, grads_ref = _grads(released, batch)
    loss, grads = _grads(fused, batch)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # No logits in training; eval and generation keep the released forward.
    assert fused(**batch).logits is None
    fused.eval()
    assert fused(**{k: v for k, v in batch.items() if k != "labels"}).logits is not None

    fused.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["architectures"] == [
        model_class(model_type).__name__]
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved")
    assert type(reloaded) is model_class(model_type)


def test_text_only_batches_still_give_the_vision_tower_gradients(tiny_model_dir):
    path = tiny_model_dir("qwen2_5_vl")
    model = with_training_forward(model_class("qwen2_5_vl"), fused_loss=False, vision_sync=("image",)) \
        .from_pretrained(path, dtype=torch.float32).train()
    text_only = _batch(path, n=2, image_every=0)
    assert "pixel_values" not in text_only
    loss, grads = _grads(model, text_only)
    visual = [n for n, p in model.named_parameters() if n.startswith("model.visual")]
    assert visual and all(n in grads for n in visual)  # DDP needs a gradient for every one ...
    assert all(float(grads[n].abs().max()) == 0.0 for n in visual)  # ... and they change nothing
    released = model_class("qwen2_5_vl").from_pretrained(path, dtype=torch.float32).train()
    torch.testing.assert_close(loss, released(**text_only).loss)


@pytest.mark.slow
def test_an_optimizer_step_is_the_per_token_mean_however_samples_are_grouped(tiny_model_dir, tmp_path):
    """One SGD step of 6 samples as 1 micro-batch of 6, or 3 micro-batches of 2 (flattened,
    uneven token counts) moves every weight the same: the step is the per-token mean."""
    from qwenvl.train.train_qwen import train

    path = tiny_model_dir("qwen2_5_vl")
    moved = {}
    for batch, accumulation in ((6, 1), (2, 3)):
        out = tmp_path / f"b{batch}"
        train(["--model_name_or_path", str(path), "--dataset_use", "demo_shapes%5,demo_text%10",
               "--output_dir", str(out), "--tune_mm_llm", "True", "--tune_mm_mlp", "True",
               "--tune_mm_vision", "True", "--data_flatten", "True", "--max_steps", "1",
               "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation),
               "--optim", "sgd", "--learning_rate", "1.0", "--lr_scheduler_type", "constant",
               "--max_grad_norm", "0", "--weight_decay", "0", "--max_pixels", str(112 * 112),
               "--min_pixels", str(56 * 56), "--save_strategy", "no", "--report_to", "none",
               "--dataloader_num_workers", "0", "--seed", "3"])
        moved[batch] = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).state_dict()
    start = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).state_dict()
    changed = 0
    for name, before in start.items():
        delta_one, delta_three = moved[6][name] - before, moved[2][name] - before
        torch.testing.assert_close(delta_three, delta_one, rtol=1e-4, atol=1e-6, msg=name)
        changed += int(bool(delta_one.abs().max() > 0))
    assert changed > len(start) // 2


@pytest.mark.slow
def test_token_budget_batching_trains_on_packs_within_the_budget(tiny_model_dir, tmp_path, monkeypatch):
    """--max_tokens_per_batch: every micro-batch is one flattened row within the budget."""
    from qwenvl.train import trainer as trainer_module
    from qwenvl.train.train_qwen import train

    seen = []

    class Recording(trainer_module.QwenVLTrainer):  # records each micro-batch's row length
        def training_step(self, model, inputs, num_items_in_batch=None):
            seen.append(int(inputs["input_ids"].shape[1]))
            return super().training_step(model, inputs, num_items_in_batch)

    monkeypatch.setattr(trainer_module, "QwenVLTrainer", Recording)  # our own class, for this test only
    path = tiny_model_dir("qwen2_5_vl")
    budget = 400
    # Annotation copies in tmp: the length cache is written next to the annotations, not in the repo.
    dictionary = copy_demo_annotations(tmp_path / "data")
    train(["--model_name_or_path", str(path), "--dataset_use", "demo_shapes%10,demo_text%20",
           "--dataset_dictionary", str(dictionary), "--output_dir", str(tmp_path / "out"), "--tune_mm_llm", "True", "--tune_mm_mlp", "True",
           "--data_flatten", "True", "--max_tokens_per_batch", str(budget), "--max_steps", "4",
           "--max_pixels", str(112 * 112), "--min_pixels", str(56 * 56), "--save_strategy", "no",
           "--report_to", "none", "--dataloader_num_workers", "0", "--learning_rate", "1e-3"])
    assert len(seen) == 4
    assert all(length <= budget for length in seen)
    assert max(seen) > budget // 2  # packs are filled, not one sample each
