"""``train_qwen.py --help``: this port's flags first, under headings, then transformers' TrainingArguments.

``HfArgumentParser`` lists the flags in dataclass order, and our ``TrainingArguments``
subclass puts its own fields after the ~120 inherited ones (and keeps overridden ones,
such as ``--optim``, where the parent had them): our flags ended up split between the
top and the bottom of a 774-line page.  ``GroupedHelpParser`` only changes how the page
is laid out; parsing is HfArgumentParser's, untouched.

Headings: one per argument dataclass (``help_heading`` attribute, else the class name)
for the model and data flags; the training flags this port adds or redefines are split
by ``TRAINING_SECTIONS`` (a flag not listed there goes under "Other training flags of
this port", so a new flag is never lost); everything inherited unchanged from
``transformers.TrainingArguments`` comes last.
"""
from __future__ import annotations

import dataclasses

import transformers

USAGE = ("train_qwen.py [RUN.json | RUN.yaml] [--flag value ...]\n"
         "       (a run file holds {flag: value}; flags after it override it)")

TRAINING_SECTIONS = {
    "Learning rates and LoRA": ("mm_projector_lr", "vision_tower_lr", "lora_enable", "lora_r", "lora_alpha",
                                "lora_dropout", "lora_target_modules", "lora_target_parameters"),
    "Sequence length and batching": ("model_max_length", "online_packing", "max_tokens_per_batch",
                                     "max_patches_per_pack", "group_by_modality_length"),
    "Loss": ("loss_kernel", "router_aux_loss_coef"),
    "Speed and memory": ("master_weights", "compile_layers", "activation_memory_budget"),
    "Official-script flags (this port's defaults)": ("cache_dir", "optim", "warmup_ratio", "remove_unused_columns"),
}
OTHER_OWN_TRAINING = "Other training flags of this port"
INHERITED = "transformers TrainingArguments (see the transformers documentation)"


def own_training_fields(dtype) -> list[str]:
    """Fields of a ``transformers.TrainingArguments`` subclass that it adds or redefines, in order."""
    base = {f.name: f for f in dataclasses.fields(transformers.TrainingArguments)}
    own = []
    for f in dataclasses.fields(dtype):
        parent = base.get(f.name)
        if parent is None or parent.default != f.default or parent.metadata.get("help") != f.metadata.get("help"):
            own.append(f.name)
    return own


def help_sections(dataclass_types) -> list[tuple[str, list[str]]]:
    """(heading, field names) in the order ``--help`` shows them."""
    sections, inherited = [], []
    for dtype in dataclass_types:
        names = [f.name for f in dataclasses.fields(dtype) if f.init]
        if not issubclass(dtype, transformers.TrainingArguments):
            sections.append((getattr(dtype, "help_heading", dtype.__name__), names))
            continue
        own = own_training_fields(dtype)
        listed = set()
        for heading, fields in TRAINING_SECTIONS.items():
            present = [n for n in fields if n in own]
            listed.update(present)
            if present:
                sections.append((heading, present))
        rest = [n for n in own if n not in listed]
        if rest:
            sections.append((OTHER_OWN_TRAINING, rest))
        inherited += [n for n in names if n not in own]
    if inherited:
        sections.append((INHERITED, inherited))
    return sections


class GroupedHelpParser(transformers.HfArgumentParser):
    """HfArgumentParser whose help page groups the flags by ``help_sections``."""

    def format_help(self) -> str:
        by_dest: dict[str, list] = {}
        for action in self._actions:
            by_dest.setdefault(action.dest, []).append(action)  # --x and its --no_x share a dest
        formatter = self._get_formatter()
        formatter.add_usage(self.usage, self._actions, self._mutually_exclusive_groups)
        formatter.add_text(self.description)
        shown = set()
        sections = [("Options", ["help"])] + help_sections(self.dataclass_types)
        for heading, names in sections:
            actions = [a for n in names for a in by_dest.get(n, []) if id(a) not in shown]
            if not actions:
                continue
            shown.update(id(a) for a in actions)
            formatter.start_section(heading)
            formatter.add_arguments(actions)
            formatter.end_section()
        leftover = [a for a in self._actions if id(a) not in shown]
        if leftover:  # nothing may go missing from the page
            formatter.start_section("Other flags")
            formatter.add_arguments(leftover)
            formatter.end_section()
        formatter.add_text(self.epilog)
        return formatter.format_help()
