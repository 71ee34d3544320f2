"""Per-component learning rates under a DeepSpeed config's ``"scheduler"`` section.

``--mm_projector_lr`` and ``--vision_tower_lr`` give the merger and the vision tower their own
optimizer groups and rates (``optim.py``).  A ``"scheduler"`` section makes DeepSpeed build the
schedule itself, from the section's parameters (``deepspeed/runtime/lr_schedules.py``), and each
rate parameter there is one number that ``_format_param`` applies to *every* group, unless it is a
list with one value per group.  transformers fills ``"auto"`` with the scalar ``--learning_rate``
(``warmup_max_lr``; ``warmup_min_lr`` with 0), so the merger and the tower trained at the language
model's rates without a word.  Measured before this module (ZeRO-2, CPU, ``WarmupDecayLR``,
``--learning_rate 1e-3 --mm_projector_lr 1e-2 --vision_tower_lr 2e-4``): every group trained at
5e-4, then 1e-3, where the merger's flag asked for 5e-3, then 1e-2.

Here, once the optimizer's groups exist and before DeepSpeed builds its scheduler from the config
(transformers' ``deepspeed_optim_sched`` calls ``create_optimizer`` first), each such rate becomes a
list, the schedule's value scaled to each group's own rate: ``warmup_max_lr`` "auto" is each group's
rate.  Every group then follows the schedule's shape at its own rate, as with transformers' own
schedulers (a factor times each group's base rate).  A number written in the config cannot say which
group it is for, so with differing per-group rates a run stops at start-up naming it and the fix
(``rate_problems``); 0 means the same for every group and is kept.

``WarmupCosineLR`` needs none of this: it works in ratios of each group's own rate.  A list already
in the config is the user's own per-group values and is kept (its length is checked).  An
``"optimizer"`` section is built by DeepSpeed over the same groups (``QwenVLTrainer.create_optimizer``),
so it needs nothing here, but for Adagrad under ZeRO, which DeepSpeed collapses into one group and then
fails on (``zero_adagrad_problem``, refused at start-up).
"""
from __future__ import annotations

from numbers import Real

from .arguments import ConfigError

# Each DeepSpeed schedule's rate parameters, with DeepSpeed's default where the section leaves one out
# (None: WarmupLR then takes each group's own rate; OneCycle has no default, DeepSpeed requires both).
RATE_PARAMETERS = {
    "WarmupLR": {"warmup_min_lr": 0.0, "warmup_max_lr": None},
    "WarmupDecayLR": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.001},
    "OneCycle": {"cycle_min_lr": None, "cycle_max_lr": None},
    "LRRangeTest": {"lr_range_test_min_lr": 0.001},
    "WarmupCosineLR": {},  # warmup_min_ratio, cos_min_ratio: ratios of each group's own rate
}

# The rate parameters transformers fills where the config says "auto" (HfTrainerDeepSpeedConfig.
# trainer_config_process), as a factor of --learning_rate: warmup_min_lr with 0, warmup_max_lr with the rate.
AUTO_FILLED = {"warmup_min_lr": 0.0, "warmup_max_lr": 1.0}


def differing_group_rates(values: dict) -> dict[str, float]:
    """The per-group rate flags (``--mm_projector_lr``, ``--vision_tower_lr``) set to a rate other than
    ``--learning_rate``, by flag name, from parsed flag ``values``."""
    from .optim import RULES

    base = float(values.get("learning_rate") or 0.0)
    found = {}
    for rule in RULES:
        rate = values.get(rule.lr_flag) if rule.lr_flag else None
        if rate is not None and float(rate) != base:
            found[rule.lr_flag] = float(rate)
    return found


def _nonzero_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and value != 0


def _flags_text(flags: dict[str, float]) -> str:
    return " and ".join(f"--{name} {rate:g}" for name, rate in flags.items())


def _drop_text(flags: dict[str, float]) -> str:
    return " and ".join(f"--{name}" for name in flags)


def _rate_problem(source: str, kind: str, found: dict, flags: dict[str, float]) -> str:
    """One message for the rate parameters of a "scheduler" section that would give every group one rate;
    ``found``: {parameter: its number, or None where the section leaves it out for DeepSpeed's default}."""
    written = " and ".join(f"sets {name} {value:g}" if value is not None else
                           f"leaves out {name} (DeepSpeed's default: {RATE_PARAMETERS[kind][name]:g})"
                           for name, value in found.items())
    names = " and ".join(found)
    if all(name in AUTO_FILLED for name in found):
        fix = (f'Write "auto" for {names}: transformers fills it from --learning_rate, and each group then follows '
               "the schedule at its own rate" + (' (warmup_min_lr "auto" is 0)' if "warmup_min_lr" in found else ""))
    else:
        fix = (f"Give {names} as lists with one value per optimizer group (in the order of the \"optimizer groups\" "
               'table the run prints), or use WarmupLR / WarmupDecayLR with "auto" rates, or WarmupCosineLR, which '
               "follow each group's rate")
    return (f'the DeepSpeed config {source}: its "scheduler" ({kind}) {written}: DeepSpeed gives such a number '
            f"to every optimizer group, so {_flags_text(flags)} would be ignored (those parts would train at the "
            f"language model's rates). {fix}; or drop {_drop_text(flags)}.")


def rate_problems(config: dict, values: dict, source: str) -> list[str]:
    """Why the DeepSpeed ``config`` (as the user wrote it, before transformers fills "auto") cannot keep the
    per-group rates that flag ``values`` ask for; empty when it can, or when every group has one rate.

    ``source``: how to name the config in the messages (its path)."""
    flags = differing_group_rates(values)
    if not flags or not isinstance(config, dict):
        return []
    # An "optimizer" section is fine: QwenVLTrainer.create_optimizer has DeepSpeed build it over the groups.
    problems = []
    section = config.get("scheduler")
    kind = section.get("type") if isinstance(section, dict) else None
    params = (section.get("params") or {}) if isinstance(section, dict) else {}
    found = {}
    for name, default in RATE_PARAMETERS.get(kind, {}).items():
        value = params.get(name, default)
        # None: each group's own rate (WarmupLR's default); a list: the user's own per-group values; "auto":
        # filled by transformers (warmup_*), or DeepSpeed's own error (cycle_*); 0 is 0 at every group's scale.
        if _nonzero_number(value):
            found[name] = value if name in params else None
    if found:
        problems.append(_rate_problem(source, kind, found, flags))
    return problems


def zero_adagrad_problem(config: dict, optim, source: str, one_group: bool = False) -> str | None:
    """Why Adagrad cannot train the optimizer's groups under this DeepSpeed ``config``, or None.

    ZeRO stages 1-3 rebuild a torch ``Adagrad`` over their flat fp32 partitions as *one* group with the
    optimizer's defaults (``deepspeed/runtime/zero/stage_1_and_2.py`` and ``stage3.py``: "State initialization
    for the Adagrad optimizer occurs at construction"), whatever groups it was built over: the per-component
    rates and the no-decay groups are dropped, and the first step then stops with an IndexError deep in
    DeepSpeed (measured, DeepSpeed 0.19.8 on CPU, ZeRO-2 and ZeRO-3: one group at --learning_rate and
    the section's weight decay, then ``param_groups[param_group_idx]['params'][0]``: list index out of range
    for every group after the first).  Our groups split decay from no-decay wherever biases or norms train,
    so such runs fail; ``one_group``: the run has a single group (LoRA on the language model alone), which
    trains.  With ``offload_optimizer`` DeepSpeed builds its CPU Adagrad instead (not a torch Adagrad), and
    stage 0 keeps torch's: both train the groups.
    ``optim``: the run's --optim (used only without an "optimizer" section)."""
    if not isinstance(config, dict) or one_group:
        return None
    zero = config.get("zero_optimization") or {}
    stage = int(zero["stage"]) if str(zero.get("stage", "")).isdigit() else 0
    offload = str((zero.get("offload_optimizer") or {}).get("device", "none")).lower()
    if stage < 1 or offload in ("cpu", "nvme"):
        return None
    section = config.get("optimizer")
    if isinstance(section, dict):
        if str(section.get("type", "")).lower() != "adagrad":
            return None
        what = f'its "optimizer" section ({section.get("type")})'
        fix = ('Choose another "type" (AdamW), or keep Adagrad with the optimizer offloaded '
               '(zero_optimization.offload_optimizer.device "cpu": DeepSpeed\'s CPU Adagrad keeps the groups) or '
               "under ZeRO stage 0")
    else:
        if str(getattr(optim, "value", optim)).lower() != "adagrad":
            return None
        what = "--optim adagrad"
        fix = ('Use another --optim (adamw_torch), or for Adagrad an "optimizer" section {"type": "Adagrad"} with '
               'the optimizer offloaded (zero_optimization.offload_optimizer.device "cpu": DeepSpeed\'s CPU Adagrad '
               "keeps the groups), or ZeRO stage 0")
    return (f"the DeepSpeed config {source}: {what} cannot run under ZeRO stage {stage}: DeepSpeed rebuilds torch's "
            "Adagrad over its partitions as one parameter group (every part at --learning_rate, one weight decay) "
            "and then, with the optimizer groups this run has (decay and no-decay, per component), stops at the "
            f"first step with an IndexError. {fix}.")


def spread_rates_over_groups(config: dict, groups: list[dict], args, source: str) -> dict[str, list[float]]:
    """Turn the rate parameters of ``config``'s ``"scheduler"`` section into lists, one value per optimizer
    group in ``groups`` order, each the schedule's value at that group's own rate; in place.

    ``config`` is the live DeepSpeed config, its "auto" values already filled by transformers (so
    ``warmup_max_lr`` equals ``args.learning_rate``); ``args``: the run's TrainingArguments.  Call after
    the groups are built and before DeepSpeed builds the scheduler from ``config``.  Returns what was
    rewritten, by parameter (empty when the groups share one rate or the section has no rate parameters).
    Raises ConfigError for a list of another length than the groups, and for a number that cannot be
    scaled (``rate_problems`` refuses those at start-up)."""
    section = config.get("scheduler")
    if not isinstance(section, dict):
        return {}
    kind, params = section.get("type"), section.get("params")
    if not isinstance(params, dict):
        params = section["params"] = {}
    names = [group.get("name", str(i)) for i, group in enumerate(groups)]
    rates = [float(group["lr"]) for group in groups]
    spread = {}
    for name, default in RATE_PARAMETERS.get(kind, {}).items():
        value = params.get(name, default)
        if isinstance(value, (list, tuple)):
            if len(value) != len(groups):
                raise ConfigError(f'the DeepSpeed config {source}: its "scheduler" ({kind}) {name} has {len(value)} '
                                  f"values, but the optimizer has {len(groups)} groups ({', '.join(names)}): give one "
                                  "value per group, in that order.")
            continue
        if len(set(rates)) == 1 or not _nonzero_number(value):
            continue
        factor = AUTO_FILLED.get(name)
        if not factor or value != factor * args.learning_rate:
            raise ConfigError(_rate_problem(source, kind, {name: value if name in params else None},
                                            differing_group_rates(vars(args))))
        # transformers' "auto": the schedule's peak is --learning_rate for the llm group, each group's own rate here.
        params[name] = [factor * rate for rate in rates]
        spread[name] = params[name]
    return spread


def describe_spread(kind: str, spread: dict[str, list[float]], groups: list[dict]) -> str:
    """The line a run prints when its DeepSpeed schedule's rates were made per group."""
    parts = []
    for name, values in spread.items():
        shown = {}
        for group, value in zip(groups, values):
            shown.setdefault(group.get("name", "").removesuffix("_no_decay"), value)
        parts.append(f"{name} " + ", ".join(f"{group} {value:g}" for group, value in shown.items()))
    return (f'DeepSpeed "scheduler" {kind}: each optimizer group follows the schedule at its own rate ('
            + "; ".join(parts) + ")")
