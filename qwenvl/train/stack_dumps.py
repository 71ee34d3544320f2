"""``kill -USR1 <pid>`` prints every thread's Python stack of a training process to its stderr; the run goes on.

A run that stops making progress usually waits somewhere: in a collective another rank never
joined, in a read of a stalled mount, in a lock.  Which one is the first thing to know, and
py-spy, the usual answer, is often not installed or not allowed (ptrace) in a container.
Python's ``faulthandler`` needs neither: registered for SIGUSR1, it writes the stacks of all
threads from inside the signal handler, even while the process is blocked in C code, and
returns.  Dataloader workers forked from the trainer inherit it.  The test suite sends it to
a command that ran past its time limit before killing it, so a hang leaves its stacks in the log.
"""
from __future__ import annotations

import faulthandler
import io
import signal
import sys

STACK_DUMP_SIGNAL = getattr(signal, "SIGUSR1", None)  # None on Windows


def enable_stack_dumps() -> bool:
    """Print all threads' stacks to stderr on SIGUSR1 (process keeps running); False where impossible."""
    if STACK_DUMP_SIGNAL is None:
        return False
    for stream in (sys.stderr, sys.__stderr__):  # a captured sys.stderr (pytest) may have no descriptor
        try:
            stream.fileno()
        except (AttributeError, ValueError, io.UnsupportedOperation):
            continue
        faulthandler.register(STACK_DUMP_SIGNAL, file=stream, all_threads=True, chain=False)
        return True
    return False
