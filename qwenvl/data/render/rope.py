"""mRoPE positions computed by the model's own ``get_rope_index``.

The position ids of a sample are a pure function of its tokens and visual grids,
so they are computed once per sample in the dataloader (CPU, in parallel with the
GPU) instead of inside every forward.  To stay exactly equal to what the model
would compute, we call the model's own method on an instance of the family's base
model built on the ``meta`` device: it holds the config, no weights, and costs
nothing to build, even for a 72B config.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def _unpartitioned_construction():
    """Build models whole even when a ZeRO-3 config is registered.

    ``--deepspeed zero3.json`` registers its config globally, and transformers then
    builds every model partitioned (``deepspeed.zero.Init``), which cannot work on the
    ``meta`` device.  The helper model here holds no weights, so it opts out.
    """
    try:
        from transformers.integrations.deepspeed import (
            is_deepspeed_zero3_enabled, set_hf_deepspeed_config, unset_hf_deepspeed_config)
    except ImportError:  # transformers without the DeepSpeed integration
        yield
        return
    if not is_deepspeed_zero3_enabled():
        yield
        return
    from qwenvl.hf_internals import registered_deepspeed_config

    config = registered_deepspeed_config()
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            set_hf_deepspeed_config(config)


class RopeIndex:
    """Compute (3, L) mRoPE position ids of one sample with the family's own code."""

    def __init__(self, config):
        from transformers import AutoModel

        self.config = config
        with _unpartitioned_construction(), torch.device("meta"):
            self._model = AutoModel.from_config(config)
        self.family = config.model_type

    def __call__(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                 image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                 second_per_grid_ts: torch.Tensor | None = None) -> torch.Tensor:
        """Positions of one sample: ``input_ids`` and ``mm_token_type_ids`` of shape (L,); returns (3, L)."""
        kwargs = {}
        if second_per_grid_ts is not None:
            # Only Qwen2.5-VL's signature has it; the others take **kwargs and ignore it.
            kwargs["second_per_grid_ts"] = second_per_grid_ts
        positions, _ = self._model.get_rope_index(
            input_ids[None], mm_token_type_ids=mm_token_type_ids[None],
            image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw, **kwargs)
        return positions[:, 0]
