"""Command lines written for the official qwen-vl-finetune code, read as that code reads them.

Users paste the official README's example command and the official ``scripts/sft*.sh``
flags.  Three things in them need a word here, and nothing else:

* ``--max_pixels 576\\*28\\*28``: the README writes pixel budgets as products (the shell
  passes ``576*28*28``); they are multiplied out, as the README means.
* A learning rate for a frozen component (the README passes ``--tune_mm_vision False``
  with ``--vision_tower_lr 1e-6``): the official code builds no parameter group for a
  frozen component, so the rate has no effect.  It is accepted with one warning that
  says so, and dropped, so no optimizer group is asked for it.
* ``--base_interval``: declared by the official ``DataArguments`` but read nowhere since
  the official code moved to ``--video_fps`` (frames per second = 1 / interval).
  Accepted with one warning, no effect, as there.

Every other official flag is a field of ``ModelArguments``, ``DataArguments`` or
``TrainingArguments`` with the official name and meaning (tests/train/test_official_flags.py
runs the README's example on a tiny model).
"""
from __future__ import annotations

import re

PIXEL_FLAGS = ("max_pixels", "min_pixels", "video_max_pixels", "video_min_pixels")
_PRODUCT = re.compile(r"^\s*\d+(\s*[*xX]\s*\d+)+\s*$")

# (learning-rate flag, the tune flag that freezes its component, what the component is)
FROZEN_LR_FLAGS = (
    ("vision_tower_lr", "tune_mm_vision", "the vision tower"),
    ("mm_projector_lr", "tune_mm_mlp", "the merger"),
)
NO_EFFECT_FLAGS = {
    "base_interval": "--base_interval {value} has no effect (the official code no longer reads it either): "
                     "frames are sampled at --video_fps per second (1 / base_interval).",
}


def _product(text: str) -> str:
    result = 1
    for factor in re.split(r"[*xX]", text):
        result *= int(factor)
    return str(result)


def expand_pixel_products(argv: list[str]) -> list[str]:
    """``--max_pixels 576*28*28`` -> ``--max_pixels 451584`` (also ``--flag=576*28*28``)."""
    flags = {f"--{name}" for name in PIXEL_FLAGS}
    out = list(argv)
    for i, arg in enumerate(out):
        name, eq, value = arg.partition("=")
        if eq and name in flags and _PRODUCT.match(value):
            out[i] = f"{name}={_product(value)}"
        elif arg in flags and i + 1 < len(out) and _PRODUCT.match(out[i + 1]):
            out[i + 1] = _product(out[i + 1])
    return out


def expand_file_products(values: dict) -> dict:
    """The same for a run file's values (``max_pixels: 576*28*28``)."""
    for name in PIXEL_FLAGS:
        if isinstance(values.get(name), str) and _PRODUCT.match(values[name]):
            values[name] = int(_product(values[name]))
    return values


def pop_no_effect_flags(argv: list[str], file_values: dict) -> tuple[list[str], list[str]]:
    """Remove the official flags that have no effect (``--base_interval N``); returns (argv, warnings)."""
    warnings = []
    out: list[str] = []
    i = 0
    found: dict[str, str] = {}
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        key = name[2:] if name.startswith("--") else None
        if key in NO_EFFECT_FLAGS:
            if eq:
                found[key] = value
                i += 1
            else:
                found[key] = argv[i + 1] if i + 1 < len(argv) else ""
                i += 2
            continue
        out.append(argv[i])
        i += 1
    for key in NO_EFFECT_FLAGS:
        if key in file_values:
            found.setdefault(key, str(file_values.pop(key)))
    warnings += [NO_EFFECT_FLAGS[key].format(value=value) for key, value in found.items()]
    return out, warnings


def drop_frozen_learning_rates(values: dict) -> list[str]:
    """Unset a learning rate whose component is frozen; returns one warning per such flag."""
    warnings = []
    for lr_flag, tune_flag, component in FROZEN_LR_FLAGS:
        if values.get(lr_flag) is not None and not values.get(tune_flag):
            warnings.append(f"--{lr_flag} {values[lr_flag]} has no effect: {component} is frozen "
                            f"(--{tune_flag} False). Pass --{tune_flag} True to train it at that rate.")
            values[lr_flag] = None
    return warnings
