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
            return path, ignored
        ignored.append(IgnoredCheckpoint(path, _why_incomplete(path)))
    return None, ignored


def mark_complete(folder: str, step: int) -> None:
    """Sync every file of ``folder`` to disk, then write the marker aside and rename it in place.

    The order matters: the marker must not reach the disk before the files it vouches for.
    """
    files = []
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files.append(os.path.relpath(path, folder))
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    temporary = os.path.join(folder, f".{COMPLETE_MARKER}.tmp")
    with open(temporary, "w") as f:
        json.dump({"step": int(step), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "files": sorted(files)}, f, indent=1)
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
    if requested:
        notes = [] if is_complete(requested) else [
            f"warning: {requested} has no {COMPLETE_MARKER}; it may be cut off (resuming from it as asked)"]
        return requested, notes
    checkpoint, ignored = newest_complete_checkpoint(output_dir)
    notes = [f"ignoring {item.path}: {item.why}; it is replaced when that step is saved again" for item in ignored]
    return checkpoint, notes


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
