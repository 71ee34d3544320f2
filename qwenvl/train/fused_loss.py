"""A subclass of each family's model with two training-time behaviours.

1. **Fused loss.**  The released forward computes ``lm_head`` over every position
   (B x L x 151936 floats, several GiB at 16k tokens) and only then the loss.  Here,
   when training with labels, the base model runs, then ``causal_lm_loss`` on the final
   hidden states (Liger's fused kernel on CUDA when installed, our chunked one
   otherwise): the logits are never materialised.
2. **Vision tower always runs.**  A micro-batch without images still has to use the
   vision tower when (a) it has trainable parameters under DDP (every parameter must
   get a gradient, or DDP's reducer errors out) or (b) ZeRO-3 or FSDP2 shards it (every
   rank must gather the same modules in the same order, or the ranks hang).  A dummy
   input of one merged token runs through it and enters the input embeddings multiplied
   by zero.
   The dummy calls run after the input embeddings and before the model's own forward:
   every rank then runs embeddings, the tower twice (images, videos: real or dummy), the
   decoder layers, so the ranks' all-gathers pair up in the same order.
3. **Router load-balancing loss** (MoE families, ``moe.py``): router logits are asked for
   while training and ``coef * load_balancing_loss`` is added to the loss, on both paths.

``with_training_forward(cls, ...)`` returns a subclass of ``cls`` that keeps the
parent's class name, so checkpoints list the released architecture and load without
this package.  Generation, eval without labels and saving are the parent's.  This is
subclassing, not patching: transformers' own classes are left untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from .loss import causal_lm_loss
from .moe import load_balancing_loss, text_config_of
from .sharding import gathered_weight


@dataclass
class FusedLossOutput(ModelOutput):
    """The training output of the fused path: a loss (with the router loss of MoE models added,
    ``aux_loss`` unscaled) and no logits."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def _dummy_visual_input(visual_config, like: torch.Tensor, temporal: int = 1):
    """Pixels and grid of the smallest input the vision tower accepts: one merged token
    (``merge x merge`` patches of ``temporal`` frames' patch size)."""
    merge = visual_config.spatial_merge_size
    patch, t_patch = visual_config.patch_size, visual_config.temporal_patch_size
    channels = getattr(visual_config, "in_channels", getattr(visual_config, "in_chans", 3))
    pixels = torch.zeros(merge * merge * temporal, channels * t_patch * patch * patch, dtype=like.dtype,
                         device=like.device)
    grid = torch.tensor([[temporal, merge, merge]], device=like.device)
    return pixels, grid


def _tensors(value):
    """The tensors in a model output, list or tuple (nested), in order."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (dict, ModelOutput)):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


class _TrainingForward:
    fused_loss: bool = False
    # MoE: train with the router load-balancing loss (moe.py); the coefficient is the config's.
    router_aux_loss: bool = False
    # Which visual inputs must run on every training forward: () none, ("image",) one call
    # of the tower (DDP with trainable visual parameters), ("image", "video") both calls
    # (ZeRO-3, where the number of tower calls must match across ranks).
    vision_sync: tuple = ()

    def _dummy_vision_loss(self, kwargs) -> torch.Tensor | None:
        if "video" in self.vision_sync:  # ZeRO-3 / FSDP: both tower calls on every rank
            missing = [k for k in ("pixel_values", "pixel_values_videos") if kwargs.get(k) is None]
        elif kwargs.get("pixel_values") is None and kwargs.get("pixel_values_videos") is None:
            missing = ["pixel_values"]  # DDP: one call gives every visual parameter a gradient
        else:
            missing = []
        extra = None
        visual = self.model.visual
        for _ in missing:
            pixels, grid = _dummy_visual_input(visual.config, like=next(visual.parameters()))
            out = visual(pixels, grid_thw=grid)
            # Every output, Qwen3-VL's deepstack features included: each parameter that gets a
            # gradient on one rank must get one on every rank (FSDP2 reduce-scatters only the
            # parameters that have a gradient; a missing deepstack merger's changed the size).
            for tensor in _tensors(out):
                term = tensor.float().sum() * 0.0
                extra = term if extra is None else extra + term
        return extra

    def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None or not self.training:
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return super().forward(input_ids=input_ids, labels=labels, **kwargs)
        if self.router_aux_loss:
            kwargs["output_router_logits"] = True  # asked per call: saved configs keep the released False
        hook = None
        if self.vision_sync and input_ids is not None:
            hook = self.get_input_embeddings().register_forward_hook(self._vision_sync_hook(kwargs))
        try:
            return self._training_outputs(input_ids, labels, num_items_in_batch, kwargs)
        finally:
            if hook is not None:
                hook.remove()

    def _vision_sync_hook(self, kwargs):
        """A forward hook for the input embeddings that runs the dummy tower calls there.

        Same order of sharded modules on every rank: embeddings, the tower twice (real calls
        inside the model's forward, dummies in this hook), decoder layers.  The zero term enters
        the embeddings, not the loss: its backward then runs when the gradient reaches the
        embeddings, where a real tower call's backward runs, so the ranks' reduce-scatters of
        trainable vision units pair up in order too.  A hook rather than passing
        ``inputs_embeds``: Qwen2-VL and Qwen3-VL refuse ``input_ids`` and ``inputs_embeds``
        together, and the placeholders are found from ``input_ids``."""
        done = []

        def hook(module, args, output):
            if done:  # once per forward
                return output
            done.append(True)
            extra = self._dummy_vision_loss(kwargs)
            return output if extra is None else output + extra.to(output.dtype)

        return hook

    def _training_outputs(self, input_ids, labels, num_items_in_batch, kwargs):
        if self.fused_loss:
            kwargs.pop("logits_to_keep", None)
            outputs = self.model(input_ids=input_ids, **kwargs)
            # Under FSDP2 the head's weight is read outside lm_head's forward: take it gathered.
            loss = causal_lm_loss(outputs.last_hidden_state, gathered_weight(self.lm_head), labels,
                                  num_items_in_batch=num_items_in_batch)
            aux = None
            if self.router_aux_loss:
                aux = load_balancing_loss(self, outputs.router_logits, kwargs.get("attention_mask"))
                loss = loss + text_config_of(self.config).router_aux_loss_coef * aux.to(loss.device)
            outputs = FusedLossOutput(loss=loss, aux_loss=aux)
        else:
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            outputs = super().forward(input_ids=input_ids, labels=labels, **kwargs)
        return outputs


_CACHE: dict[tuple, type] = {}


def with_training_forward(cls: type, fused_loss: bool, vision_sync: tuple = (), router_aux_loss: bool = False) -> type:
    """``cls`` with the training behaviours above (same class name, same weights layout)."""
    key = (cls, bool(fused_loss), tuple(vision_sync), bool(router_aux_loss))
    if key not in _CACHE:
        _CACHE[key] = type(cls.__name__, (_TrainingForward, cls), {
            "__module__": cls.__module__, "__doc__": cls.__doc__, "fused_loss": bool(fused_loss),
            "vision_sync": tuple(vision_sync), "router_aux_loss": bool(router_aux_loss)})
    return _CACHE[key]


def use_fused_loss(kernel: str, zero3: bool) -> bool:
    """Whether ``--loss_kernel`` asks for the fused path here: ``model`` never, ``fused``
    always (the argument checks refuse it under ZeRO-3, where ``lm_head``'s weight is
    partitioned outside its own forward), ``auto`` except under ZeRO-3."""
    if kernel == "model":
        return False
    return kernel == "fused" or not zero3


def vision_sync_for(zero3: bool, distributed: bool, visual_trainable: bool, fsdp: bool = False) -> tuple:
    """Which dummy vision calls a run needs (see the module docstring); ``fsdp``: FSDP shards the
    vision blocks (every rank must gather them as often as the others)."""
    if zero3 or (fsdp and distributed):
        return ("image", "video")
    if distributed and visual_trainable:
        return ("image",)
    return ()
