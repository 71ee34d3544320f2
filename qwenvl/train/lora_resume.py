"""Resuming a LoRA checkpoint: are its adapters where this run's flags put them, at the same rank and scale?

The Trainer resumes a LoRA checkpoint with ``PeftModel.load_adapter`` into the adapter this run's flags
built: this run's ``LoraConfig`` stays, and the saved tensors load by name, non-strictly.  An adapter that
differs from the flags therefore does not resume as it was trained.  Measured on tiny qwen3_vl and
qwen3_vl_moe models (transformers 5.23, peft 0.21, CPU), resuming 2 saved steps with one flag changed:

- other targets (``--lora_target_modules``, ``--lora_target_parameters``): the saved adapters the flags no
  longer name are dropped without a word and new ones start from zero.  With the optimizer state the run then
  stopped late (model loaded, ``run_args.json`` replaced) at torch's parameter-group check, or in Adam's step on
  a size mismatch (q_proj swapped for up_proj), or under ZeRO-3 in DeepSpeed's optimizer load; where the
  shapes agree (q_proj swapped for o_proj) or the checkpoint has no optimizer state (``--save_only_model``)
  it trained on, the dropped adapters' training lost;
- another ``--lora_alpha``: the saved A and B load under this run's scale alpha / r, so the adapted model
  changes at the first resumed step, silently (the final adapter_config.json then names the new alpha);
- the vision tower or merger trained fully (``modules_to_save``: ``--tune_mm_vision``, ``--tune_mm_mlp``) in
  this run only: a KeyError inside peft's loader (under ZeRO-3 torch's parameter-group ValueError inside
  DeepSpeed); in the checkpoint only: the parameter-group stop, or without optimizer state their trained copies
  dropped (the base weights come back).

So before anything is written (under ZeRO-3 the targets once the model has loaded, still before any training),
the checkpoint's ``adapter_config.json`` is compared with the flags on what both resolve to on this model, with
peft's own matching rules: the sets of modules and expert weights that
get adapters and of modules trained fully.  An equivalent spelling (``experts`` for both expert weights, the
default list or an explicit list of the same modules, another order) resumes.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace

from .arguments import DEFAULT_LORA_TARGETS, ConfigError

ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class AdapterLayout:
    """Where one LoRA config puts adapters on one model, by full module and parameter names."""
    modules: frozenset[str]     # modules with a LoRA adapter (target_modules)
    parameters: frozenset[str]  # expert weights with a LoRA adapter (target_parameters)
    full: frozenset[str]        # modules trained fully, stored whole in the checkpoint (modules_to_save)


def saved_lora_config(checkpoint: str):
    """The ``LoraConfig`` of a LoRA checkpoint's ``adapter_config.json``; None without one or when it cannot be
    read (the Trainer's loader then names the file)."""
    from peft import LoraConfig

    if not os.path.isfile(os.path.join(checkpoint, ADAPTER_CONFIG)):
        return None
    try:
        return LoraConfig.from_pretrained(checkpoint)
    except (OSError, ValueError, TypeError):
        return None


def layout_of(config, model) -> AdapterLayout:
    """What ``config`` (a peft ``LoraConfig``) adapts on ``model`` (unwrapped, weightless or loaded), matched
    as peft matches when it wraps the model: ``check_target_module_exists`` for target_modules, a name or
    ``.``-suffix for target_parameters, a plain suffix for modules_to_save."""
    from peft.tuners.tuners_utils import check_target_module_exists

    names = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    full_targets = list(config.modules_to_save or [])
    modules = frozenset(name for name in names if config.target_modules
                        and check_target_module_exists(config, name))
    wanted = set(config.target_parameters or [])
    parameters = frozenset(name for name, _ in model.named_parameters(remove_duplicate=False)
                           if name in wanted or any(name.endswith(f".{t}") for t in wanted))
    full = frozenset(name for name in names if any(name.endswith(t) for t in full_targets))
    return AdapterLayout(modules, parameters, full)


def check_lora_resume(checkpoint: str, model_config, model_args, training_args, model=None) -> bool:
    """ConfigError when the LoRA checkpoint ``checkpoint`` cannot resume under this run's LoRA flags: another rank
    (its adapters cannot load), another alpha (they would act at another scale), adapters on other modules or
    expert weights, other modules trained fully.  The message names what the checkpoint holds and the flags
    that resume it.

    The targets are resolved on ``model`` (unwrapped; default: a weightless model of ``model_config``).  Under
    ZeRO-3 no weightless model can be built: then only rank and alpha are compared and False is returned, and the
    caller checks again with the loaded model before LoRA wraps it.  True when nothing is left to compare.
    """
    saved = saved_lora_config(checkpoint) if training_args.lora_enable else None
    if saved is None:
        return True
    from .model import weightless_model

    if model is None:
        model = weightless_model(model_config)
    problems = _scale_problems(saved, training_args)
    if model is not None:
        problems += _target_problems(saved, model, model_args, training_args)
    if problems:
        raise ConfigError(_message(checkpoint, saved, problems, *_resume_flags(saved, model)))
    return model is not None


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _scale_problems(saved, training_args) -> list[str]:
    problems = []
    if saved.r != training_args.lora_r:
        problems.append(f"rank: r {saved.r} in the checkpoint, --lora_r {training_args.lora_r} in this run: its "
                        "adapters cannot load")
    if float(saved.lora_alpha) != float(training_args.lora_alpha):
        # At the checkpoint's rank (another rank cannot load at all): the scale alpha / r changes by this factor.
        factor = float(training_args.lora_alpha) / float(saved.lora_alpha)
        problems.append(f"scale: lora_alpha {_number(saved.lora_alpha)} in the checkpoint, --lora_alpha "
                        f"{_number(training_args.lora_alpha)} in this run: from the first resumed step its adapters "
                        f"would act {factor:g}x as strongly as they were trained to (peft scales them by alpha / r)")
    return problems


def _grouped(names) -> str:
    """Names with their layer / block indices folded: ``model.language_model.layers.*.self_attn.v_proj (4)``."""
    groups = Counter(re.sub(r"\.\d+(?=\.|$)", ".*", name) for name in names)
    shown = [f"{group} ({count})" if count > 1 else group for group, count in sorted(groups.items())]
    return ", ".join(shown[:6]) + (f" and {len(shown) - 6} more" if len(shown) > 6 else "")


# (AdapterLayout field, what it is, what happens to those only this run names)
_KINDS = (
    ("modules", "adapters on modules (--lora_target_modules)", "started from zero"),
    ("parameters", "adapters on expert weights (--lora_target_parameters)", "started from zero"),
    ("full", "modules trained fully (modules_to_save: --tune_mm_mlp, --tune_mm_vision)", "missing from the checkpoint"),
)


def _target_problems(saved, model, model_args, training_args) -> list[str]:
    from .model import lora_config

    there = layout_of(saved, model)
    here = layout_of(lora_config(model, model_args, training_args), model)
    problems = []
    for field, title, fate_of_new in _KINDS:
        old, new = getattr(there, field), getattr(here, field)
        parts = ([f"only in the checkpoint, so dropped with their training: {_grouped(old - new)}"] if old - new
                 else []) + ([f"only in this run, so {fate_of_new}: {_grouped(new - old)}"] if new - old else [])
        if parts:
            problems.append(f"{title}: " + "; ".join(parts))
    return problems


def _resume_flags(saved, model) -> tuple[list[str], list[str]]:
    """``(flags, notes)``: the flags that rebuild ``saved`` on ``model`` (rank and alpha alone without a model), and
    what to leave out or what no flag value reproduces."""
    flags, notes = [f"--lora_r {saved.r}", f"--lora_alpha {_number(saved.lora_alpha)}"], []
    if model is None:
        return flags, ["the targets are compared once the model has loaded"]
    for part in (_modules_flag, _parameters_flag, _full_flags):
        flag, note = part(saved, model)
        flags += [flag] if flag else []
        notes += [note] if note else []
    return flags, notes


def _lora(**fields):
    from peft import LoraConfig

    return LoraConfig(r=1, **fields)


def _default_order(name: str) -> tuple[int, str]:
    return (DEFAULT_LORA_TARGETS.index(name) if name in DEFAULT_LORA_TARGETS else len(DEFAULT_LORA_TARGETS), name)


def _modules_flag(saved, model) -> tuple[str | None, str | None]:
    from .model import lora_target_pattern

    target = layout_of(saved, model).modules
    if not target:
        return '--lora_target_modules ""', None
    names = sorted({name.rsplit(".", 1)[-1] for name in target}, key=_default_order)
    spelled = _lora(target_modules=lora_target_pattern(names), modules_to_save=saved.modules_to_save)
    if layout_of(spelled, model).modules != target:
        return None, f"no --lora_target_modules value adapts exactly its {len(target)} modules"
    default = _lora(target_modules=lora_target_pattern(DEFAULT_LORA_TARGETS), modules_to_save=saved.modules_to_save)
    return (f"--lora_target_modules {','.join(names)}",
            "those are the default --lora_target_modules" if layout_of(default, model).modules == target else None)


def _parameters_flag(saved, model) -> tuple[str | None, str | None]:
    from .lora_experts import ALL_EXPERTS, expert_weight_names

    target = layout_of(saved, model).parameters
    if not target:
        return None, "without --lora_target_parameters"
    if layout_of(_lora(target_parameters=expert_weight_names(model)), model).parameters == target:
        return f"--lora_target_parameters {ALL_EXPERTS}", None
    names = sorted({re.sub(r"^.*?\.layers\.\d+\.", "", name) for name in target})
    if layout_of(_lora(target_parameters=names), model).parameters == target:
        return f"--lora_target_parameters {','.join(names)}", None
    return None, f"no --lora_target_parameters value adapts exactly its {len(target)} expert weights"


def _full_flags(saved, model) -> tuple[str | None, str | None]:
    from .model import full_training_modules

    target = layout_of(saved, model).full
    for mlp in (False, True):
        for vision in (False, True):
            tune = SimpleNamespace(tune_mm_llm=True, tune_mm_mlp=mlp, tune_mm_vision=vision)
            if layout_of(_lora(modules_to_save=full_training_modules(model, tune) or None), model).full == target:
                return f"--tune_mm_mlp {mlp} --tune_mm_vision {vision}", None
    return None, f"no --tune_mm_mlp / --tune_mm_vision trains exactly its {len(target)} modules fully"


def _message(checkpoint: str, saved, problems: list[str], flags: list[str], notes: list[str]) -> str:
    modules = saved.target_modules if isinstance(saved.target_modules, str) else sorted(saved.target_modules or [])
    held = (f"r {saved.r}, lora_alpha {_number(saved.lora_alpha)}, target_modules {modules}, "
            f"target_parameters {sorted(saved.target_parameters or [])}, "
            f"modules_to_save {sorted(saved.modules_to_save or [])}")
    return (f"{checkpoint} holds LoRA adapters that this run's flags would not resume as they were trained:\n  - "
            + "\n  - ".join(problems)
            + f"\nIts {ADAPTER_CONFIG}: {held}.\nResume it with {' '.join(flags)}"
            + (f" ({'; '.join(notes)})" if notes else "")
            + "; or give a new --output_dir to start a new run (merge it with python -m qwenvl.tools.merge_lora and "
            "pass the merged folder as --model_name_or_path to start from its weights).")
