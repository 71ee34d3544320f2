"""One training at a time per ``--output_dir``.

Two launches of one command (a double submit, a retry while the first still runs) would both
resume and save into the folder, each deleting the other's half-written checkpoint as "left by a
killed run".  The main process of a run therefore holds a lock on ``<output_dir>/.training.lock``
from the moment it writes ``run_args.json`` until it ends; a second launch stops at once, naming the
holder's pid and host (written into the file by the holder).

The lock is a POSIX record lock (``fcntl.lockf``, ``F_SETLK``), not ``flock``, on purpose:

* a record lock belongs to the *process* that took it and is not inherited across ``fork``, so it
  ends with the main process however that process ends (SIGKILL, OOM killer);
* a ``flock`` lock belongs to the open file description, which forked children share: dataloader
  workers and media reader processes forked after the lock was taken would keep it after the main
  process was killed, and a relaunch after the crash would be refused for as long as such an orphan
  lives.

The price of record locks: closing *any* descriptor of the file in the holding process drops its
lock, so this module is the only code that opens the file, and the holder never opens it twice.
Locks also never conflict within one process, so a check in the holder's own process sees no lock.
On a file system without lock support (some network mounts) the run goes on unlocked.
"""
from __future__ import annotations

import json
import os

LOCK = ".training.lock"
# Real path of each lock file this process holds -> (this process's pid, the open file). A forked child inherits
# the dict but not the locks: the pid tells them apart.
_held: dict[str, tuple[int, object]] = {}


def _lock_path(output_dir: str) -> str:
    return os.path.realpath(os.path.join(output_dir, LOCK))


def _holds(path: str) -> bool:
    return path in _held and _held[path][0] == os.getpid()


def _refusal(output_dir: str, holder: str) -> Exception:
    """The ConfigError naming the run that holds the lock (``holder``: what it wrote into the file)."""
    from .arguments import ConfigError  # imported here: holding the lock stays free of transformers' import

    try:
        who = json.loads(holder)
        by = f"pid {who['pid']} on {who['host']}, started {who['started']}"
    except (ValueError, KeyError, TypeError):
        by = "another process"  # the holder has not written its name yet
    return ConfigError(f"another training run ({by}) is training into --output_dir {output_dir}: two runs there "
                       "would overwrite each other's checkpoints (and delete one being written). Wait for it to "
                       "finish, stop it, or choose another --output_dir.")


def refuse_if_locked(output_dir: str) -> None:
    """ConfigError naming the holder when a running training holds ``output_dir``'s lock; creates nothing.

    A probe with a shared lock on a read-only descriptor: it fails only while a holder has the
    exclusive lock, and is given back at once.
    """
    path = _lock_path(output_dir)
    if _holds(path):  # closing a descriptor of the file here would drop this process's lock
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        return
    try:
        f = open(path)
    except OSError:  # no lock file: no run ever locked the folder
        return
    with f:
        try:
            fcntl.lockf(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held by a live process
            raise _refusal(output_dir, f.read()) from None
        except OSError:  # a file system without record locks
            return
        fcntl.lockf(f, fcntl.LOCK_UN)


def lock_output_dir(output_dir: str) -> None:
    """Take ``output_dir``'s lock for this process (the run's main process), or raise ConfigError naming its holder.

    Held until ``release_output_dir_locks`` or the end of the process; not passed on to forked children.
    """
    try:
        import fcntl
    except ImportError:
        return
    import socket
    import time

    os.makedirs(output_dir, exist_ok=True)
    path = _lock_path(output_dir)
    if _holds(path):
        return
    f = open(path, "a+")  # an exclusive record lock needs a descriptor open for writing
    try:
        for attempt in range(3):  # another launch's refuse_if_locked probe holds a shared lock for an instant
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except (BlockingIOError, PermissionError):
                if attempt == 2:
                    raise
                time.sleep(0.05)
    except (BlockingIOError, PermissionError):
        f.seek(0)
        holder = f.read()
        f.close()
        raise _refusal(output_dir, holder) from None
    except OSError:  # a file system without record locks: go on unlocked
        f.close()
        return
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
    f.flush()
    _held[path] = (os.getpid(), f)


def release_output_dir_locks() -> None:
    """Release the output folder locks this process holds (at the end of ``train``, which may run again)."""
    while _held:
        _held.popitem()[1][1].close()  # in a forked child that closes only its copy: the parent keeps its lock
