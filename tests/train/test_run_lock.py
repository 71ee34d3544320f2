"""One training at a time per --output_dir (qwenvl/train/run_lock.py), with real processes holding the lock."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qwenvl.train.arguments import ConfigError
from qwenvl.train.output_dir import check_output_dir
from qwenvl.train.run_lock import LOCK, lock_output_dir, refuse_if_locked, release_output_dir_locks

REPO = Path(__file__).resolve().parents[2]

# A run's main process: takes the lock, then forks a child that outlives it (a dataloader worker or a
# media reader process forked after the lock was taken), prints the child's pid and waits to be killed.
HOLDER_WITH_A_FORKED_CHILD = textwrap.dedent("""
    import os, sys, time
    from qwenvl.train.run_lock import lock_output_dir
    lock_output_dir(sys.argv[1])
    child = os.fork()
    if child == 0:
        time.sleep(600)
        os._exit(0)
    print(child, flush=True)
    time.sleep(600)
""")


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_relaunch_gets_the_lock_when_the_holder_was_killed_while_its_forked_children_live(tmp_path):
    """With flock the forked child shared the lock's open file description and kept the lock after the main
    process was killed: a relaunch after a crash was refused for as long as such an orphan lived."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_WITH_A_FORKED_CHILD, str(out)], env=_env(),
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = None
    try:
        child = int(holder.stdout.readline())
        with pytest.raises(ConfigError) as refused:  # while the holder lives: refused, naming it
            refuse_if_locked(str(out))
        assert (f"another training run (pid {holder.pid} on {socket.gethostname()}, started "
                in str(refused.value)) and f"is training into --output_dir {out}" in str(refused.value)
        with pytest.raises(ConfigError, match=f"pid {holder.pid} on "):
            lock_output_dir(str(out))

        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert _alive(child)  # the orphan still runs, with the lock file open
        refuse_if_locked(str(out))
        assert check_output_dir(str(out), False) is None  # only the lock file there: an empty folder
        lock_output_dir(str(out))  # the relaunch takes the lock
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    finally:
        release_output_dir_locks()
        holder.kill()
        holder.wait()
        holder.stdout.close()
        if child and _alive(child):
            os.kill(child, signal.SIGKILL)


def _in_a_forked_process(function) -> tuple[int, str]:
    """Exit status and error message of ``function()`` run in a forked child: another process, as a second
    launch is, without a second import of transformers."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        status, text = 0, ""
        try:
            function()
        except BaseException as err:  # everything goes back to the parent; the child never returns into pytest
            status, text = 1, f"{type(err).__name__}: {err}"
        os.write(write, text.encode())
        os._exit(status)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), text


def test_the_holding_process_keeps_its_lock_when_it_checks_the_folder(tmp_path):
    """A POSIX record lock is dropped when its process closes any descriptor of the file: the holder's own
    check of the folder (which opens and closes the lock file elsewhere) must not give the lock away."""
    out = tmp_path / "out"
    lock_output_dir(str(out))
    try:
        check_output_dir(str(out), False)  # train() in the same process again, or a notebook
        lock_output_dir(str(out))
        status, text = _in_a_forked_process(lambda: lock_output_dir(str(out)))
        assert status == 1 and text.startswith(f"ConfigError: another training run (pid {os.getpid()} on "
                                               f"{socket.gethostname()}, started "), text
    finally:
        release_output_dir_locks()
    refuse_if_locked(str(out))  # released: nothing holds it
    assert _in_a_forked_process(lambda: (lock_output_dir(str(out)), release_output_dir_locks())) == (0, "")
