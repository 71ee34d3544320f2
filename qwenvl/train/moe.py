"""The router load-balancing loss of the mixture-of-experts families (``qwen3_vl_moe``, ``qwen3_5_moe``).

Without it the router of a fine-tuned MoE model drifts towards a few experts (the released
configs say so and ship ``output_router_logits=False`` only because that is the inference
default).  Here it is on whenever such a model trains with labels:

    loss = next-token loss + router_aux_loss_coef * load_balancing_loss(router logits of every layer)

``load_balancing_loss`` is transformers' own ``load_balancing_loss_func`` of the family
(Switch Transformer, eqs. 4-6: experts x fraction of tokens routed x mean router probability,
summed over layers' concatenated tokens; padding excluded by the attention mask, a flattened
batch has none).  The coefficient is ``--router_aux_loss_coef``, by default the checkpoint's
``text_config.router_aux_loss_coef`` (0.001 in the released Qwen3-VL-MoE and Qwen3.5-MoE
configs); 0 turns the loss off.  The training forward (``fused_loss.py``) asks the model for
router logits only while training, so saved configs keep ``output_router_logits=False`` and
inference pays nothing.  The trainer logs the unscaled value as ``router_aux_loss``.

LoRA on experts: the experts of both families are fused 3-D parameters
(``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj``, no ``nn.Linear`` per expert), which
``--lora_target_parameters`` adapts (``lora_experts.py``); ``--lora_target_modules`` reaches only the attention projections, the linear-attention
projections (``in_proj_qkv in_proj_z in_proj_b in_proj_a out_proj``, Qwen3.5; all in the default targets), the shared expert
(``shared_expert.gate_proj/up_proj/down_proj``, Qwen3.5) and the router (``gate``, not advised).
"""
from __future__ import annotations

import sys

import torch

MOE_MODEL_TYPES = ("qwen3_vl_moe", "qwen3_5_moe")


def text_config_of(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def router_aux_loss_coef(config, requested: float | None) -> float:
    """The coefficient to train with: ``requested`` (the flag) if given, else the config's.
    0.0 for models without experts."""
    if config.model_type not in MOE_MODEL_TYPES:
        return 0.0
    if requested is not None:
        if requested < 0:
            from .arguments import ConfigError

            raise ConfigError(f"--router_aux_loss_coef must be >= 0 (0 turns the router loss off), got {requested}.")
        return float(requested)
    return float(getattr(text_config_of(config), "router_aux_loss_coef", 0.0) or 0.0)


def set_router_aux_loss_coef(config, coef: float) -> None:
    """Write the coefficient where the released forward reads it (``text_config.router_aux_loss_coef``)."""
    text = text_config_of(config)
    if hasattr(text, "router_aux_loss_coef"):
        text.router_aux_loss_coef = coef


def load_balancing_loss(model: torch.nn.Module, router_logits, attention_mask=None) -> torch.Tensor:
    """The family's own ``load_balancing_loss_func`` over ``router_logits`` (one tensor per MoE layer)."""
    # The first class up the MRO whose module defines it: FSDP2 wraps the model in a class of its
    # own (defined in torch's FSDP module), and our training subclass keeps the family's module.
    module = next(m for m in (sys.modules.get(c.__module__) for c in type(model).__mro__)
                  if hasattr(m, "load_balancing_loss_func"))
    text = text_config_of(model.config)
    return module.load_balancing_loss_func(router_logits, text.num_experts, text.num_experts_per_tok,
                                           attention_mask)
