"""Which ``checkpoint-N`` folders are complete, and room on the disk for the next one.

A checkpoint is written file by file (weights, optimizer, scheduler, RNG, trainer
state; under DeepSpeed by every rank).  A run killed in the middle leaves a folder
that looks like a checkpoint and is not one; the Trainer's ``get_last_checkpoint``
would pick it by its number and the resume would fail.  So a folder counts as a
checkpoint only once ``COMPLETE_MARKER`` is in it: ``QwenVLTrainer`` writes the
marker after every file of the save is on disk (every rank done, files synced),
with a write-aside-then-rename, so the marker itself is never half-written.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass

from .arguments import ConfigError
from .resume_schedule import holds_schedule_state
from .weights_files import safetensors_problem  # one header check for checkpoints and the base model

COMPLETE_MARKER = "checkpoint_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class IgnoredCheckpoint:
    path: str
    why: str


def is_complete(folder: str) -> bool:
    """True when ``folder`` holds the completion marker of a finished save."""
    return os.path.isfile(os.path.join(folder, COMPLETE_MARKER))


def _why_incomplete(folder: str) -> str:
    missing = [name for name in ("trainer_state.json",) if not os.path.exists(os.path.join(folder, name))]
    detail = f"; {', '.join(missing)} missing" if missing else ""
    return (f"no {COMPLETE_MARKER}: the run stopped while writing it (killed, out of disk), or an older "
            f"version wrote it{detail}")


def checkpoint_folders(output_dir: str) -> list[str]:
    """``checkpoint-N`` folders of ``output_dir``, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def newest_complete_checkpoint(output_dir: str) -> tuple[str | None, list[IgnoredCheckpoint]]:
    """The newest complete checkpoint of ``output_dir`` (or None) and the newer folders passed over, with why.

    A folder where no checkpoint has the marker was written before markers existed: there
    a checkpoint with ``trainer_state.json`` counts (the Trainer writes it last), so an
    upgrade in the middle of a run still resumes.
    """
    folders = checkpoint_folders(output_dir)
    legacy = not any(is_complete(path) for path in folders)
    ignored = []
    for path in reversed(folders):
        if is_complete(path) or (legacy and os.path.isfile(os.path.join(path, "trainer_state.json"))):
            problem = checkpoint_problem(path)
            if problem is None:
                return path, ignored
            ignored.append(IgnoredCheckpoint(path, f"damaged: {problem}"))
            continue
        ignored.append(IgnoredCheckpoint(path, _why_incomplete(path)))
    return None, ignored


def checkpoint_problem(folder: str) -> str | None:
    """Why ``folder`` cannot be resumed from although it looks like a checkpoint, or None.

    Checks what is cheap to check before the model loads: ``trainer_state.json`` is a JSON
    object, and every file the completion marker lists is still there with the size it was
    saved with (a deleted shard or optimizer state, a weights file cut short by a copy).
    A missing ``optimizer.pt`` would otherwise be skipped by the Trainer without a word,
    restarting the optimizer's moments; a damaged file would fail deep inside its loader.
    """
    try:
        with open(os.path.join(folder, "trainer_state.json")) as f:
            state = json.load(f)
    except FileNotFoundError:
        return "it has no trainer_state.json (a Trainer checkpoint-N folder has one)"
    except (OSError, ValueError) as err:
        return f"its trainer_state.json cannot be read ({err})"
    if not isinstance(state, dict):
        return "its trainer_state.json does not hold a JSON object"
    try:
        with open(os.path.join(folder, COMPLETE_MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        marker = {}  # no marker (an older version's checkpoint): no list of files to compare with
    sizes = marker.get("sizes") or {name: None for name in marker.get("files", [])}
    missing, changed = [], []
    for name, size in sizes.items():
        path = os.path.join(folder, name)
        if name in ("trainer_state.json", COMPLETE_MARKER):
            continue  # checked above; the Trainer may rewrite it (best model bookkeeping)
        if not os.path.isfile(path):
            missing.append(name)
        elif size is not None and os.path.getsize(path) != size:
            changed.append(f"{name} is {os.path.getsize(path):,} bytes, {size:,} when saved")
    if missing:
        return f"{', '.join(missing)} missing (listed in its {COMPLETE_MARKER})"
    if changed:
        return f"{'; '.join(changed)} (cut short or replaced since)"
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            if name.endswith(".safetensors"):
                problem = safetensors_problem(os.path.join(root, name))
                if problem:
                    return f"{os.path.relpath(os.path.join(root, name), folder)} {problem}"
    return None


def mark_complete(folder: str, step: int) -> None:
    """Sync every file of ``folder`` to disk, then write the marker aside and rename it in place.

    The order matters: the marker must not reach the disk before the files it vouches for.
    """
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if os.path.relpath(path, folder) != COMPLETE_MARKER:  # a marker of an earlier save of this step
                sizes[os.path.relpath(path, folder)] = os.path.getsize(path)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    temporary = os.path.join(folder, f".{COMPLETE_MARKER}.tmp")
    with open(temporary, "w") as f:
        # The sizes let a resume tell a file cut short or replaced since (checkpoint_problem).
        json.dump({"step": int(step), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "files": sorted(sizes), "sizes": dict(sorted(sizes.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(folder, COMPLETE_MARKER))
    _sync_dir(folder)


def _sync_dir(folder: str) -> None:
    # A rename is durable only once the directory entry is synced (POSIX; a no-op elsewhere).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _mount_point(path: str) -> str:
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _human(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "bytes" else f"{int(value)} bytes"
        value /= 1024
    return f"{n} bytes"


class DiskFullError(OSError):
    """Not enough room on the disk of the output folder for a checkpoint."""


def disk_full_message(folder: str, needed: int, free: int) -> str:
    """What a user needs to know when a checkpoint does not fit: the disk, what it needs, what is free."""
    return (f"not enough disk space to save {folder}: it needs about {needed:,} bytes ({_human(needed)}), "
            f"the disk mounted at {_mount_point(os.path.dirname(folder) or '.')} has {free:,} bytes "
            f"({_human(free)}) free. Free space there (older checkpoints: --save_total_limit), or point "
            "--output_dir at a larger disk, then run the same command again to resume from the last "
            "complete checkpoint.")


def check_free_space(folder: str, needed: int, free: int | None = None) -> None:
    """Raise ``DiskFullError`` when the disk holding ``folder`` has less than ``needed`` bytes free.

    ``free`` defaults to what the disk reports now.
    """
    parent = folder
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if free is None:
        free = shutil.disk_usage(parent or ".").free
    if free < needed:
        raise DiskFullError(disk_full_message(folder, needed, free))


def folder_bytes(folder: str) -> int:
    """Bytes of every file under ``folder`` (0 when it does not exist)."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def resume_point(requested: str | None, output_dir: str) -> tuple[str | None, list[str]]:
    """The checkpoint a run resumes from, and what to tell the user about it.

    ``requested`` is ``--resume_from_checkpoint``: a folder is used as given (with a
    warning when it is not marked complete); without it, the newest complete
    ``checkpoint-N`` of ``output_dir`` (the official code's habit), naming each newer
    folder that was passed over and why.
    """
    if isinstance(requested, str) and requested.lower() == "true":
        requested = None  # the Trainer's resume_from_checkpoint=True: the newest checkpoint of --output_dir
    if requested:
        flag = f"--resume_from_checkpoint {requested}"
        if requested.lower() in ("false", "none", "no"):
            raise ConfigError(f"{flag}: a run resumes from the newest complete checkpoint of --output_dir on its own "
                              "(as the official code); to start again instead, choose a new --output_dir. Leave the "
                              "flag out, or give a checkpoint-N folder to resume from.")
        if not os.path.isdir(requested):
            raise ConfigError(f"{flag}: no such folder. Give a checkpoint-N folder of a run, or leave the flag out "
                              "to resume from the newest complete checkpoint in --output_dir.")
        if os.path.isfile(os.path.join(requested, "run_args.json")):
            # A run's folder holds its final model and trainer_state.json but no optimizer, scheduler or RNG
            # state: the Trainer would resume from it with a new optimizer, without a word.
            inside = [os.path.basename(p) for p in checkpoint_folders(requested)]
            raise ConfigError(f"{flag} is a run's output folder, not a checkpoint (it has no optimizer state). "
                              + (f"Resume from one of its checkpoints ({', '.join(inside)}), or " if inside else "")
                              + f"leave the flag out with --output_dir {requested} to resume its newest checkpoint; "
                              "to start from its final weights with a new optimizer, pass it as --model_name_or_path.")
        problem = checkpoint_problem(requested)
        if problem:
            older = [p for p in checkpoint_folders(os.path.dirname(os.path.abspath(requested)))
                     if p != os.path.abspath(requested) and checkpoint_problem(p) is None]
            hint = f" ({', '.join(os.path.basename(p) for p in older)} next to it)" if older else ""
            raise ConfigError(f"{flag} cannot be resumed from: {problem}. Resume from another checkpoint{hint}, or "
                              "leave the flag out; to start from its weights with a new optimizer, pass the folder "
                              "as --model_name_or_path instead.")
        notes = [] if is_complete(requested) else [
            f"warning: {requested} has no {COMPLETE_MARKER}; it may be cut off (resuming from it as asked)"]
        return requested, notes + _model_only_note(requested)
    checkpoint, ignored = newest_complete_checkpoint(output_dir)
    notes = [f"ignoring {item.path}: {item.why}; it is replaced when that step is saved again" for item in ignored]
    return checkpoint, notes + (_model_only_note(checkpoint) if checkpoint else [])


def _model_only_note(checkpoint: str) -> list[str]:
    """The warning for a checkpoint without optimizer and scheduler state (``--save_only_model``): the Trainer
    resumes it without a word, with a new optimizer and the learning-rate schedule started again."""
    if holds_schedule_state(checkpoint):  # the one test of what a resume restores (resume_schedule.py)
        return []
    return [f"warning: {checkpoint} holds no optimizer or scheduler state (saved with --save_only_model): resuming "
            "restores the weights and the step, but the optimizer starts anew and the learning-rate schedule "
            "(warmup included) starts again from its first step. To continue exactly, save full checkpoints "
            "(leave --save_only_model out)."]


def remove_stale_checkpoints(output_dir: str, keep: int | None, protected: set[str] = frozenset()) -> list[str]:
    """Delete all but the ``keep`` newest complete checkpoints (and incomplete ones older than those).

    The newest complete one and ``protected`` (the best model's) always stay; incomplete
    folders newer than the newest complete one stay too (they may be a save in progress on
    another node).  ``keep`` None or < 1 deletes nothing.  Returns what was deleted.
    """
    if keep is None or keep < 1:
        return []
    folders = checkpoint_folders(output_dir)
    complete = [f for f in folders if is_complete(f)]
    if not complete:
        return []
    kept = set(complete[-keep:]) | {os.path.normpath(p) for p in protected} | {complete[-1]}
    newest = folders.index(complete[-1])
    deleted = []
    for folder in folders[:newest]:
        if os.path.normpath(folder) not in kept and folder not in kept:
            shutil.rmtree(folder, ignore_errors=True)
            deleted.append(folder)
    return deleted


# Config fields that fix the shapes of the weights: a checkpoint whose values differ cannot load into the model.
_SHAPE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "depth", "out_hidden_size", "num_heads",
                 "num_experts", "moe_intermediate_size", "patch_size", "spatial_merge_size", "temporal_patch_size")


def _shape_fields(config: dict, prefix: str = "") -> dict:
    found = {f"{prefix}{k}": config[k] for k in _SHAPE_FIELDS if k in config and not (prefix and k == "model_type")}
    for sub in ("text_config", "vision_config"):
        if isinstance(config.get(sub), dict):
            found.update(_shape_fields(config[sub], f"{sub}."))
    return found


def check_checkpoint_fits(checkpoint: str, model_config, lora_enable: bool, model_name_or_path: str) -> None:
    """ConfigError when ``checkpoint`` cannot be resumed by this run's model: a LoRA checkpoint resumed
    without ``--lora_enable`` (or the reverse), or a full checkpoint of a model of other shapes.  A LoRA
    checkpoint's rank, alpha and targets are compared with the flags by ``lora_resume.check_lora_resume``.

    Checked before ``run_args.json`` is written and the model loads; the Trainer would otherwise fail
    deep inside its loader (a missing index, size mismatches) after the folder was taken over.
    """
    adapter = os.path.isfile(os.path.join(checkpoint, "adapter_config.json"))
    full = os.path.isfile(os.path.join(checkpoint, "config.json"))
    start_from = ("merge it with python -m qwenvl.tools.merge_lora and pass the merged folder as "
                  "--model_name_or_path" if adapter and not full else "pass the checkpoint as --model_name_or_path")
    fix = (f"Resume with the flags of the run that wrote it, or give a new --output_dir to start a new run "
           f"({start_from} to start from its weights).")
    if adapter and not full and not lora_enable:
        raise ConfigError(f"{checkpoint} is a LoRA checkpoint (adapter_config.json), but this run trains without "
                          f"--lora_enable. Add --lora_enable True to resume it. {fix}")
    if full and not adapter and lora_enable:
        raise ConfigError(f"{checkpoint} is a full fine-tuning checkpoint, but this run trains LoRA adapters "
                          f"(--lora_enable True). Drop --lora_enable to resume it. {fix}")
    if not full:
        return
    try:
        with open(os.path.join(checkpoint, "config.json")) as f:
            saved = _shape_fields(json.load(f))
    except (OSError, ValueError):
        return  # checkpoint_problem and the loader say what is wrong with the file
    current = _shape_fields(model_config.to_dict())
    differ = [f"{k}: {saved[k]} there, {current[k]} here" for k in saved if k in current and saved[k] != current[k]]
    if differ:
        raise ConfigError(f"{checkpoint} holds a different model than --model_name_or_path {model_name_or_path} "
                          f"({'; '.join(differ[:4])}{'; ...' if len(differ) > 4 else ''}): its weights cannot "
                          f"load into it. {fix}")
