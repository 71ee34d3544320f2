"""Optimizer parameter groups, as a table of rules.

Each rule names a group, the components it takes (see ``model.component_of``) and
the flag that sets its learning rate; the first rule taking a parameter's component
wins.  Each group is then split by weight decay:

    llm,    llm_no_decay      --learning_rate
    merger, merger_no_decay   --mm_projector_lr  (else --learning_rate)
    vision, vision_no_decay   --vision_tower_lr  (else --learning_rate)

No weight decay on biases and on the weights of normalisation layers (LayerNorm,
RMSNorm of any family, found by module type, so the Qwen2.5-VL merger's ``ln_q``
is included), nor on the decay parameters of Qwen3.5's Gated DeltaNet layers (``A_log``,
``dt_bias``: decay would pull every head's forgetting rate towards one value; Mamba and
flash-linear-attention mark them ``_no_weight_decay``, which is also honoured).
Embeddings (and a tied lm_head) do get weight decay, as in the official code and the
Trainer's default.  Group names stay in the optimizer's
``param_groups`` so the trainer can log ``lr/<group>``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .arguments import ConfigError
from .model import component_of


@dataclass(frozen=True)
class GroupRule:
    name: str
    components: tuple[str, ...]
    lr_flag: str | None  # the TrainingArguments field with this group's learning rate; None: --learning_rate


# The llm group comes first: the Trainer logs group 0's rate as "learning_rate".
RULES = (
    GroupRule("llm", ("llm", "lm_head"), None),
    GroupRule("merger", ("merger",), "mm_projector_lr"),
    GroupRule("vision", ("vision",), "vision_tower_lr"),
)


# Linear-attention (state-space style) parameters that set how fast the state decays.
STATE_DECAY_PARAMETERS = ("A_log", "dt_bias")


def no_decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of biases, of normalisation-layer weights (module class name contains 'Norm'), of the
    Gated DeltaNet decay parameters and of parameters marked ``_no_weight_decay``."""
    names = set()
    for module_name, module in model.named_modules():
        is_norm = "norm" in type(module).__name__.lower()
        for param_name, param in module.named_parameters(recurse=False):
            if (is_norm or param_name == "bias" or param_name in STATE_DECAY_PARAMETERS
                    or getattr(param, "_no_weight_decay", False)):
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def build_param_groups(model: torch.nn.Module, args, rules=RULES) -> list[dict]:
    """Parameter groups of the trainable parameters: ``[{"name", "params", "lr", "weight_decay"}, ...]``.

    Raises ConfigError when a rule whose learning rate was asked for (e.g.
    ``--vision_tower_lr``) takes no trainable parameter.  Asserts every trainable
    parameter lands in exactly one group.
    """
    no_decay = no_decay_parameter_names(model)
    buckets: dict[str, list] = {}
    trainable = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        trainable.append(param)
        component = component_of(name)
        rule = next((r for r in rules if component in r.components), None)
        if rule is None:
            raise ValueError(f"no optimizer rule takes component {component!r} (parameter {name})")
        key = rule.name + ("_no_decay" if name in no_decay else "")
        buckets.setdefault(key, []).append(param)

    problems = []
    for rule in rules:
        if rule.lr_flag and getattr(args, rule.lr_flag, None) is not None \
                and not (buckets.get(rule.name) or buckets.get(rule.name + "_no_decay")):
            problems.append(f"--{rule.lr_flag} is set but no trainable parameter is in the {rule.name} group "
                            f"(components {', '.join(rule.components)}).")
    if problems:
        raise ConfigError(problems)

    groups = []
    for rule in rules:
        lr = getattr(args, rule.lr_flag) if rule.lr_flag else None
        lr = args.learning_rate if lr is None else lr
        for suffix, decay in (("", args.weight_decay), ("_no_decay", 0.0)):
            params = buckets.get(rule.name + suffix)
            if params:
                groups.append({"name": rule.name + suffix, "params": params, "lr": lr, "weight_decay": decay})

    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(trainable) and set(grouped) == {id(p) for p in trainable}, \
        "every trainable parameter must be in exactly one optimizer group"
    return groups


def describe_groups(groups: list[dict]) -> str:
    """One line per group: name, parameter count, learning rate, weight decay."""
    lines = [f"{'group':<18}{'parameters':>16}{'lr':>12}{'decay':>8}"]
    for g in groups:
        n = sum(int(getattr(p, "ds_numel", p.numel())) for p in g["params"])
        lines.append(f"{g['name']:<18}{n:>16,}{g['lr']:>12.3g}{g['weight_decay']:>8.3g}")
    return "\n".join(lines)
