"""LoRA on the routed experts of MoE models: which fused expert weights ``--lora_target_parameters`` names.

The routed experts of ``qwen3_vl_moe`` and ``qwen3_5_moe`` are not ``nn.Linear`` modules but two
3-D parameters per layer, ``mlp.experts.gate_up_proj`` (experts x 2*intermediate x hidden) and
``mlp.experts.down_proj`` (experts x hidden x intermediate), so ``--lora_target_modules`` cannot
reach them.  peft's ``LoraConfig(target_parameters=...)`` wraps such parameters (``ParamWrapper``):
each expert gets its own rank-r pair, and while the experts module runs the parameter is replaced
by ``W + scaling * B @ A`` through ``torch.nn.utils.parametrize``, so every experts kernel of
transformers (eager loop, ``batched_mm``, ``grouped_mm``), which all read ``self.gate_up_proj`` /
``self.down_proj``, computes with the adapted weight.

A name is a suffix of a parameter name, as peft matches it (``name == target`` or
``name.endswith("." + target)``).  ``experts`` stands for every 3-D expert weight of the language
model.  Every name must match at least one parameter and only expert weights (3-D parameters of an
``experts`` module of the language model): peft would otherwise wrap a 2-D Linear weight (``weight``
matches every one) or Qwen3.5's 3-D ``linear_attn.conv1d.weight``, or fail deep inside.
"""
from __future__ import annotations

import logging
import re

from .arguments import ConfigError

logger = logging.getLogger(__name__)

FLAG = "--lora_target_parameters"
ALL_EXPERTS = "experts"  # shorthand: every routed-expert weight of the language model
_LAYER_INDEX = re.compile(r"^.*?\.layers\.\d+\.")


def _shape(param) -> tuple[int, ...]:
    # ZeRO-3 leaves an empty placeholder in each rank's parameter; ds_shape is its real shape.
    return tuple(getattr(param, "ds_shape", param.shape))


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _is_expert_weight(name: str, shape: tuple[int, ...]) -> bool:
    # 3-D alone is not enough: Qwen3.5's Gated DeltaNet ``linear_attn.conv1d.weight`` is 3-D too.
    from .model import component_of

    return len(shape) == 3 and ".experts." in f".{name}" and component_of(name) == "llm"


def expert_weight_names(model) -> list[str]:
    """The language model's routed-expert weights (3-D parameters of an ``experts`` module), each by its
    name inside a decoder layer (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``); empty for a
    dense model."""
    return sorted({_LAYER_INDEX.sub("", n) for n, p in model.named_parameters() if _is_expert_weight(n, _shape(p))})


def resolve_target_parameters(model, requested: list[str]) -> list[str]:
    """The parameter-name suffixes to give peft's ``target_parameters`` for ``requested`` (the flag's
    values, ``experts`` expanded); ConfigError naming the flag and the candidates when a name matches no
    parameter or a parameter that is not a 3-D expert weight of the language model."""
    if not requested:
        return []
    candidates = expert_weight_names(model)
    model_type = getattr(model.config, "model_type", "?")
    if not candidates:
        raise ConfigError(f"{FLAG} {','.join(requested)}: this model (model_type {model_type}) has no routed "
                          "experts (3-D expert weights); only the MoE families (qwen3_vl_moe, qwen3_5_moe) have "
                          f"them. Drop {FLAG} and put adapters on Linear layers with --lora_target_modules.")
    listing = (f"The routed-expert weights of this model (model_type {model_type}) are: {', '.join(candidates)} "
               f"(or {ALL_EXPERTS} for all of them).")
    params = [(n, _shape(p)) for n, p in model.named_parameters()]
    resolved, problems = [], []
    for target in requested:
        if target == ALL_EXPERTS:
            resolved += candidates
            continue
        matched = [(n, s) for n, s in params if _matches(n, target)]
        if not matched:
            problems.append(f"{target!r} matches no parameter of the model")
            continue
        wrong = [(n, s) for n, s in matched if not _is_expert_weight(n, s)]
        if wrong:
            name, shape = wrong[0]
            problems.append(f"{target!r} matches {name} (shape {list(shape)}), which is not a 3-D expert weight "
                            f"of the language model ({len(wrong)} such parameter(s)); Linear layers take "
                            "--lora_target_modules")
            continue
        resolved.append(target)
    if problems:
        raise ConfigError(f"{FLAG}: " + "; ".join(problems) + ". " + listing)
    return sorted(dict.fromkeys(resolved))


def check_target_parameters(config, requested: list[str]) -> None:
    """``resolve_target_parameters`` on a weightless (meta-device) model of ``config``: the flag's values
    are judged before any data work or weight loading (not under ZeRO-3: ``apply_lora`` judges them then,
    on the loaded model, after the data work but still before any training)."""
    from .model import weightless_model

    model = weightless_model(config) if requested else None
    if model is not None:
        resolve_target_parameters(model, requested)


def warn_about_costs(training_args, expert_weights: list[str]) -> None:
    """Say at start-up what expert adapters cost that a user would not expect.

    Memory: peft computes ``W + scaling * B @ A`` for the whole expert stack of a layer at every
    forward, and the experts kernel keeps that tensor for its backward; without gradient
    checkpointing every MoE layer holds one until the backward: another copy of all expert weights
    (measured on the tiny model: exactly the expert weights' bytes; none outside the recomputed layer
    with checkpointing).

    Compilation: peft registers and removes a parametrization on the experts module at every forward,
    which torch.compile cannot trace: each compiled decoder layer breaks its graph there and
    recompiles in the first steps until torch's recompile limit.  Results are unchanged (loss and
    gradients equal the eager ones on a tiny model); only speed is lost.
    """
    if not expert_weights:
        return
    if not getattr(training_args, "gradient_checkpointing", False):
        logger.warning("%s without --gradient_checkpointing: each MoE layer keeps its adapted expert weights "
                       "(W + B A, computed at every forward) for the backward, which takes as much memory as a "
                       "second copy of all expert weights. --gradient_checkpointing True keeps one layer's at a "
                       "time.", FLAG)
    if getattr(training_args, "compile_layers", False):
        logger.warning("--compile_layers with %s: the compiled decoder layers break their graph at each "
                       "adapted experts module (peft applies the adapter through a parametrization at every "
                       "forward) and recompile during the first steps; the training is the same, the speed-up "
                       "smaller. Measure with and without --compile_layers.", FLAG)
