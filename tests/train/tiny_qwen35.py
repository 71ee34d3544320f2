"""Tiny Qwen3.5 / Qwen3.5-MoE models built from transformers' configs, and hand-made batches.

Model-side tests only (no tokenizer): 4 decoder layers (3 Gated DeltaNet + 1 full attention, the
released pattern), interleaved mRoPE, a one-block vision tower of the released layout, a small
vocabulary with the visual token ids set in the config (read back by name, never as literals).
"""
from __future__ import annotations

import torch

TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, linear_key_head_dim=16, linear_value_head_dim=16,
            linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                             "mrope_interleaved": True, "partial_rotary_factor": 0.25})
MOE = dict(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2)
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=64, patch_size=16,
              spatial_merge_size=2, temporal_patch_size=2)
SPECIAL = dict(image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)
TEXT_TOKENS = 480  # random text ids stay below the special ones


def tiny_config(model_type: str, **text_overrides):
    """The config of a tiny ``qwen3_5`` or ``qwen3_5_moe`` model."""
    from transformers import Qwen3_5Config, Qwen3_5MoeConfig

    text = dict(TEXT, **text_overrides)
    vision = dict(VISION, out_hidden_size=text["hidden_size"])  # the merger feeds the language model
    if model_type == "qwen3_5":
        return Qwen3_5Config(text_config=text, vision_config=vision, **SPECIAL)
    if model_type == "qwen3_5_moe":
        return Qwen3_5MoeConfig(text_config=dict(MOE, **text), vision_config=vision, **SPECIAL)
    raise ValueError(model_type)


def tiny_model(model_type: str, seed: int = 0, cls=None, **text_overrides):
    """A float32 tiny model (training mode) with random weights from ``seed``."""
    from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

    config = tiny_config(model_type, **text_overrides)
    if cls is None:
        cls = Qwen3_5ForConditionalGeneration if model_type == "qwen3_5" else Qwen3_5MoeForConditionalGeneration
    torch.manual_seed(seed)
    return cls(config).float().train()


def make_samples(config, lengths, image_at=(), seed: int = 0, grid=(1, 4, 4)):
    """One dict per sample: input_ids, labels (first 3 tokens untrained), and for the samples
    whose index is in ``image_at`` an image (vision start, merged image tokens, vision end)."""
    gen = torch.Generator().manual_seed(seed)
    merge = config.vision_config.spatial_merge_size
    vc = config.vision_config
    samples = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, TEXT_TOKENS, (n,), generator=gen)
        sample = {}
        if i in image_at:
            t, h, w = grid
            image = [config.vision_start_token_id] + [config.image_token_id] * (t * h * w // merge**2) \
                + [config.vision_end_token_id]
            ids = torch.cat([ids[:2], torch.tensor(image), ids[2:]])
            sample["pixel_values"] = torch.randn(t * h * w, vc.in_channels * vc.temporal_patch_size * vc.patch_size**2,
                                                 generator=gen)
            sample["image_grid_thw"] = torch.tensor([grid])
        labels = ids.clone()
        labels[:3] = -100
        labels[labels >= TEXT_TOKENS] = -100
        sample.update(input_ids=ids, labels=labels)
        samples.append(sample)
    return samples


def _mm_types(config, ids):
    return (ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()


def mrope_positions(model, config, sample) -> torch.Tensor:
    """(3, L) mRoPE positions of one sample from the model's own ``get_rope_index``."""
    ids = sample["input_ids"][None]
    if "image_grid_thw" not in sample:
        return torch.arange(ids.shape[1]).expand(3, -1)
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=_mm_types(config, ids),
                                              image_grid_thw=sample["image_grid_thw"])
    return positions[:, 0]


def _visual(samples):
    with_image = [s for s in samples if "pixel_values" in s]
    if not with_image:
        return {}
    return {"pixel_values": torch.cat([s["pixel_values"] for s in with_image]),
            "image_grid_thw": torch.cat([s["image_grid_thw"] for s in with_image])}


def flattened_batch(model, samples) -> dict:
    """One row, 4-row position ids (text row restarting at 0 per sample), no mask: what
    ``FlattenedCollator`` writes."""
    config = model.config
    text = torch.cat([torch.arange(len(s["input_ids"])) for s in samples])
    mrope = torch.cat([mrope_positions(model, config, s) for s in samples], dim=1)
    batch = {"input_ids": torch.cat([s["input_ids"] for s in samples])[None],
             "labels": torch.cat([s["labels"] for s in samples])[None],
             "position_ids": torch.cat([text[None], mrope])[:, None, :], "use_cache": False}
    return dict(batch, **_visual(samples))


def padded_batch(model, samples, pad_id: int = 0) -> dict:
    """Right-padded rows with an attention mask and each sample's own mRoPE positions."""
    config = model.config
    longest = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), longest), pad_id)
    labels = torch.full((len(samples), longest), -100)
    mask = torch.zeros((len(samples), longest), dtype=torch.long)
    positions = torch.ones((3, len(samples), longest), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = s["input_ids"], s["labels"], 1
        positions[:, row, :n] = mrope_positions(model, config, s)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": positions,
             "use_cache": False}
    return dict(batch, **_visual(samples))


def loss_and_grads(model, batch):
    """(loss, {name: grad}) of one forward and backward."""
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
