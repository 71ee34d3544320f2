"""Run a command the way a user would, for the tests that launch training, scripts and tools.

``subprocess.run(..., capture_output=True, timeout=...)`` can hang a test, and with it the whole
suite, for ever: its output pipes stay open as long as *any* process the command started is
alive (torchrun's ranks, a media reader process, a wandb service), and after a time-out
``subprocess.run`` kills only the direct child and then waits for the pipes to close.

``run_command`` instead

* writes the output to files, so nothing a leftover process holds can block the test;
* starts the command in a session of its own and, on time-out, kills the whole session
  (every process the command started) and fails the test with the output's tail;
* checks that nothing of the command is still running once it has exited: a process it left
  behind (a reader that did not die with its parent, a rank torchrun did not reap) is killed
  and named in a warning (``leftovers="fail"`` fails the test instead).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LEFTOVER_GRACE_S = 30.0  # processes that get the parent's death late (a reader's watcher polls) may take a moment


class LeftoverProcessWarning(UserWarning):
    """A command the test ran exited but processes it started were still running."""


def run_command(cmd, *, env=None, cwd=REPO, timeout: float = 900, check: bool = False,
                leftovers: str = "warn", leftover_grace_s: float = LEFTOVER_GRACE_S) -> subprocess.CompletedProcess:
    """Run ``cmd`` (a list) and return a ``CompletedProcess`` with text ``stdout`` and ``stderr``.

    Fails the test if the command runs longer than ``timeout`` seconds (everything it started is
    killed first) or if ``check`` is set and it exits non-zero.  Processes it started that are
    still running ``leftover_grace_s`` seconds after it exited are killed, and named in a warning
    (``leftovers="warn"``), a test failure (``"fail"``) or nowhere (``"ignore"``).
    """
    if leftovers not in ("warn", "fail", "ignore"):
        raise ValueError(f"leftovers must be warn, fail or ignore, not {leftovers!r}")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, start_new_session=True)
        session = proc.pid  # the new session's id is the command's pid; its descendants keep it
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            dumped = _dump_stacks(session)
            survivors = _kill_session(session)
            proc.wait()
            pytest.fail(f"{_show(cmd)} did not finish within {timeout:g} s; killed it and {len(survivors)} "
                        f"process(es) it started (stacks of {dumped} training process(es) at the end of stderr)"
                        f"\n{_tail(out, err, stderr_chars=20000)}")
        except BaseException:  # an interruption (Ctrl-C, pytest-timeout): leave nothing running
            dumped = _dump_stacks(session)
            _kill_session(session)
            proc.wait()
            # pytest shows what a failed test printed: the command's output and where it waited
            print(f"{_show(cmd)} interrupted; stacks of {dumped} process(es) at the end of stderr\n"
                  f"{_tail(out, err, stderr_chars=20000)}", file=sys.stderr)
            raise
        left = _wait_session_empty(session, leftover_grace_s)
        if left:
            _kill_session(session)
        stdout, stderr = _read(out), _read(err)
    if left and leftovers != "ignore":
        message = (f"{_show(cmd)} exited ({code}) but left running (killed now): "
                   + "; ".join(f"pid {pid}: {line}" for pid, line in left.items()))
        if leftovers == "fail":
            pytest.fail(f"{message}\n{stdout[-2000:]}\n{stderr[-4000:]}")
        warnings.warn(message, LeftoverProcessWarning, stacklevel=2)
    if check and code != 0:
        pytest.fail(f"{_show(cmd)} exited with {code}\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(cmd, code, stdout, stderr)


def session_processes(session: int) -> dict[int, str]:
    """The live (not zombie) processes of a session: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
            if int(fields[3]) != session or fields[0] == "Z":
                continue
            line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):  # the process ended while we looked
            continue
        found[int(entry.name)] = line[:300]
    return found


def _wait_session_empty(session: int, grace_s: float) -> dict[int, str]:
    deadline = time.monotonic() + grace_s
    while True:
        left = session_processes(session)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _dump_stacks(session: int) -> int:
    """Ask the session's training processes for their stacks (qwenvl/train/stack_dumps.py); how many were asked.

    SIGUSR1 ends a process that has no handler for it, which is fine here: everything is killed next."""
    from qwenvl.train.stack_dumps import STACK_DUMP_SIGNAL

    asked = 0
    for pid, line in session_processes(session).items():
        if "python" in line and "time_limit" not in line:  # not the media readers: they only wait for work
            try:
                os.kill(pid, STACK_DUMP_SIGNAL)
                asked += 1
            except ProcessLookupError:
                pass
    if asked:
        time.sleep(3.0)  # the handlers write at once; leave them time to be scheduled on a busy machine
    return asked


def _kill_session(session: int) -> dict[int, str]:
    """SIGKILL every process of the session and wait (up to 10 s) until they are gone; returns them."""
    left = session_processes(session)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _wait_session_empty(session, 10.0)
    return left


def _read(f) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")


def _tail(out, err, stderr_chars: int = 6000) -> str:
    return f"--- stdout (tail)\n{_read(out)[-3000:]}\n--- stderr (tail)\n{_read(err)[-stderr_chars:]}"


def _show(cmd) -> str:
    return " ".join(str(c) for c in cmd)[:300]
