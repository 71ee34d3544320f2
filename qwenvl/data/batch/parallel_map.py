"""A map over forked worker processes, in order: the length cache and the audit both count records with it.

Counting a dataset is embarrassingly parallel and its state (open annotation files, a
processor) is large and not always picklable, so the state reaches the workers through
``fork`` and only the small tasks and results are pickled.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from typing import Any, Callable, Sequence

import torch

__all__ = ["parallel_chunks", "chunk_ranges"]

_WORKER: tuple | None = None  # (function, state) inherited by forked workers


def _init_worker() -> None:
    torch.set_num_threads(1)  # workers are processes; threads inside them would oversubscribe


def _run_task(task):
    fn, state = _WORKER
    return fn(state, task)


def parallel_chunks(fn: Callable[[Any, Any], Any], state: Any, tasks: Sequence, num_workers: int = 0,
                    on_result: Callable[[Any, Any], None] | None = None) -> list:
    """``[fn(state, task) for task in tasks]``, in order, on ``num_workers`` forked processes.

    ``state`` (sources, processor, ...) reaches the workers through ``fork``, never
    pickled; tasks and results are small and pickled.  ``num_workers <= 1`` or a
    platform without ``fork`` runs in this process.  ``on_result(task, result)`` is
    called in order as results arrive (progress bars).
    """
    global _WORKER
    results = []
    if num_workers <= 1 or len(tasks) <= 1 or "fork" not in mp.get_all_start_methods():
        for task in tasks:
            result = fn(state, task)
            if on_result:
                on_result(task, result)
            results.append(result)
        return results
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fork after Rust threads: keep them off
    _WORKER = (fn, state)
    try:
        with mp.get_context("fork").Pool(min(num_workers, len(tasks)), initializer=_init_worker) as pool:
            for task, result in zip(tasks, pool.imap(_run_task, tasks, chunksize=1)):
                if on_result:
                    on_result(task, result)
                results.append(result)
    finally:
        _WORKER = None
    return results


def chunk_ranges(n: int, chunk: int) -> list[tuple[int, int]]:
    """``[(0, chunk), (chunk, 2 * chunk), ..., (k, n)]``: the tasks of ``n`` records in chunks."""
    return [(start, min(n, start + chunk)) for start in range(0, n, chunk)]
