"""Whose ``--output_dir`` this is, and what changed since the run that wrote it.

A run of ours leaves ``run_args.json`` (the flags it was given) in its output
folder, written once the flags and the data passed their checks.  A non-empty
folder without it holds someone else's files (another project's model, a
colleague's run): training would overwrite its ``config.json`` and weights, so it is
refused unless ``--overwrite_output_dir`` says that is intended.  A folder with it is
a run to resume; what differs from its flags is reported, the flags that change
what is trained first.
"""
from __future__ import annotations

import json
import os

from .arguments import ConfigError
from .run_lock import LOCK, refuse_if_locked

RUN_ARGS = "run_args.json"

# Flags that change how a run is driven, logged or saved, never what it learns.
BOOKKEEPING_FLAGS = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "max_steps", "num_train_epochs",
    "logging_steps", "logging_first_step", "logging_dir", "logging_strategy", "save_steps", "save_strategy",
    "save_total_limit", "save_only_model", "report_to", "run_name", "disable_tqdm", "dataloader_num_workers",
    "dataloader_prefetch_factor", "dataloader_persistent_workers", "dataloader_pin_memory", "eval_steps",
    "eval_strategy", "eval_dataset_use", "per_device_eval_batch_size", "push_to_hub", "hub_model_id",
    "hub_strategy", "hub_private_repo", "cache_dir", "log_level", "include_num_input_tokens_seen",
})


def check_output_dir(output_dir: str, overwrite: bool) -> dict | None:
    """The flags of the run that wrote ``output_dir`` (None for a new or empty folder).

    Raises ``ConfigError`` for a non-empty folder no run of ours wrote, unless ``overwrite``.
    """
    if not os.path.isdir(output_dir):
        if os.path.exists(output_dir):
            raise ConfigError(f"--output_dir {output_dir} is a file, not a folder.")
        return None
    refuse_if_locked(output_dir)  # a training running there now: stop before anything else
    run_args = os.path.join(output_dir, RUN_ARGS)
    if os.path.isfile(run_args):
        try:
            with open(run_args) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}
    entries = sorted(e for e in os.listdir(output_dir) if e != LOCK)  # a lock left by a run of ours
    if entries and not overwrite:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ConfigError(f"--output_dir {output_dir} is not empty ({shown}) and no training run of ours wrote it "
                          f"(no {RUN_ARGS}): its files would be overwritten. Pick a new or empty folder, or pass "
                          "--overwrite_output_dir True to train into it anyway.")
    return None


def _shown(value) -> str:
    return "(default)" if value is _MISSING else json.dumps(value, default=str)


_MISSING = object()


def flag_changes(previous: dict, current: dict) -> tuple[list[str], list[str]]:
    """``(trained, other)``: ``--flag: old -> new`` lines for flags that differ, split by whether
    they change what is trained."""
    trained, other = [], []
    for key in sorted(set(previous) | set(current)):
        old, new = previous.get(key, _MISSING), current.get(key, _MISSING)
        if old == new:
            continue
        line = f"--{key}: {_shown(old)} -> {_shown(new)}"
        (other if key in BOOKKEEPING_FLAGS else trained).append(line)
    return trained, other


# Hyperparameters the optimizer state holds per parameter group: a resume restores them (torch's
# Optimizer.load_state_dict, and the scheduler's base learning rates) over the flags' values.
OPTIMIZER_STATE_FLAGS = ("learning_rate", "mm_projector_lr", "vision_tower_lr", "weight_decay", "adam_beta1",
                         "adam_beta2", "adam_epsilon")


def describe_changes(previous: dict, current: dict, checkpoint: str | None) -> str | None:
    """What to print when resuming with flags that differ from the last run's (None when none differ)."""
    trained, other = flag_changes(previous, current)
    if not (trained or other):
        return None
    where = f"resuming from {checkpoint}" if checkpoint else "this output folder"
    lines = []
    if trained:
        lines.append(f"warning: {where} with flags that change what is trained, compared with the run that wrote "
                     f"it:\n  " + "\n  ".join(trained))
    restored = [f"--{k}" for k in OPTIMIZER_STATE_FLAGS
                if checkpoint and previous.get(k, _MISSING) != current.get(k, _MISSING)]
    if restored:
        lines.append(f"warning: {', '.join(restored)} not applied: resuming restores the optimizer and learning-rate "
                     f"schedule of {checkpoint} with the values it was saved with. To train with the new values, "
                     "start a new --output_dir from its weights (a full checkpoint as --model_name_or_path).")
    if other:
        lines.append("other changed flags:\n  " + "\n  ".join(other))
    return "\n".join(lines)


def write_run_args(output_dir: str, args: dict, previous: dict | None) -> None:
    """Write ``run_args.json``; a previous, different one is kept as ``run_args.previous.json``."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RUN_ARGS)
    if previous and previous != args and os.path.isfile(path):
        os.replace(path, os.path.join(output_dir, "run_args.previous.json"))
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(args, f, indent=2, default=str)
    os.replace(temporary, path)
