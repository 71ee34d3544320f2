"""``train_qwen`` for the sharded benchmark: one optimizer step profiled, and the final save optional.

    torchrun --nproc_per_node 2 -m benchmarks.profiled_train <train_qwen flags>

Environment (read by this module only; ``benchmarks/sharded_throughput.py`` sets them):

* ``BENCH_PROFILE_STEP=N``: the N-th optimizer step (1-based) runs under ``torch.profiler``
  (CPU and CUDA); rank 0 writes ``profile_summary.json`` (and the Chrome trace, gzipped) to
  ``BENCH_PROFILE_OUT``: GPU time by kernel class (matmul, attention, NCCL all-gather /
  reduce-scatter / all-reduce, copies and casts, optimizer, other), the time the compute
  streams were busy, the NCCL time that no compute kernel overlapped ("exposed"), the GPU's
  idle time, the top kernels, and the GPU time under the libraries' named ranges (FSDP's
  ``FSDP::*``, ``Optimizer.step``).
* ``BENCH_NO_FINAL_SAVE=1``: skip the final ``save_model`` (variant runs whose save was
  measured elsewhere; a save gathers and writes the whole model, about a minute for a 7B).

The trainer is the product's ``QwenVLTrainer``; only a callback and the final save differ, so the
measured steps are the product's.
"""
from __future__ import annotations

import gzip
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import TrainerCallback

from qwenvl.train.trainer import QwenVLTrainer

KERNEL_CLASSES = (  # (class, substrings of the kernel name, lower case); first match wins
    ("nccl_all_gather", ("allgather",)),
    ("nccl_reduce_scatter", ("reducescatter",)),
    ("nccl_all_reduce", ("allreduce",)),
    ("nccl_other", ("nccl",)),
    ("attention", ("flash", "fmha", "attention", "varlen")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "wgmma", "matmul")),
    ("optimizer", ("adam", "multi_tensor_apply", "foreach")),
    ("copy_cast", ("copy", "cat", "memcpy", "memset", "split", "chunk")),
    ("triton_fused", ("triton",)),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    for label, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return label
    return "other"


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two sorted disjoint interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarise_trace(trace: dict, wall_ms: float) -> dict:
    """The summary described in the module docstring, from a Chrome trace of one step (times in ms)."""
    kernels = [e for e in trace.get("traceEvents", []) if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
               and "dur" in e]
    by_class: dict[str, float] = defaultdict(float)
    by_name: dict[str, list] = defaultdict(lambda: [0, 0.0])
    nccl, compute, everything = [], [], []
    streams: dict = defaultdict(list)
    for e in kernels:
        name = e.get("name", "")
        start, dur = float(e["ts"]), float(e["dur"])
        label = kernel_class(name)
        by_class[label] += dur
        entry = by_name[name[:120]]
        entry[0] += 1
        entry[1] += dur
        interval = (start, start + dur)
        everything.append(interval)
        (nccl if label.startswith("nccl") else compute).append(interval)
        streams[e.get("args", {}).get("stream")].append(interval)
    nccl_u, compute_u, all_u = _union(nccl), _union(compute), _union(everything)
    span = (all_u[-1][1] - all_u[0][0]) if all_u else 0.0
    annotations: dict[str, float] = defaultdict(float)
    for e in trace.get("traceEvents", []):
        if e.get("cat") == "gpu_user_annotation" and "dur" in e:
            name = e.get("name", "")
            key = name.split("(")[0].strip() if name.startswith("FSDP::") else name
            annotations[key] += float(e["dur"])
    ms = 1e-3
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:30]
    return {
        "wall_ms": round(wall_ms, 1),
        "gpu_span_ms": round(span * ms, 1),
        "gpu_busy_ms": round(_length(all_u) * ms, 1),
        "gpu_idle_ms": round((span - _length(all_u)) * ms, 1),
        "compute_busy_ms": round(_length(compute_u) * ms, 1),
        "nccl_busy_ms": round(_length(nccl_u) * ms, 1),
        "nccl_exposed_ms": round((_length(nccl_u) - _overlap(nccl_u, compute_u)) * ms, 1),
        "kernel_ms_by_class": {k: round(v * ms, 1) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "stream_busy_ms": {str(k): round(_length(_union(v)) * ms, 1) for k, v in streams.items()},
        "annotation_gpu_ms": {k: round(v * ms, 1) for k, v in sorted(annotations.items(), key=lambda kv: -kv[1])[:25]},
        "top_kernels": [{"name": n, "count": c, "ms": round(t * ms, 2)} for n, (c, t) in top],
    }


class StepProfiler(TrainerCallback):
    """Profile optimizer step ``step`` (1-based) and write the summary on the main process."""

    def __init__(self, step: int, out: Path):
        self.step = step
        self.out = out
        self._prof = None
        self._t0 = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 != self.step or self._prof is not None:
            return
        torch.cuda.synchronize()
        self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA])
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._prof is None or state.global_step != self.step:
            return
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - self._t0) * 1e3
        self._prof.__exit__(None, None, None)
        if args.process_index == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            path = self.out / "trace.json"
            self._prof.export_chrome_trace(str(path))
            summary = summarise_trace(json.loads(path.read_text()), wall_ms)
            summary["step"] = self.step
            (self.out / "profile_summary.json").write_text(json.dumps(summary, indent=2))
            with open(path, "rb") as src, gzip.open(self.out / "trace.json.gz", "wb", compresslevel=6) as dst:
                dst.write(src.read())
            path.unlink()
            print(f"[profile] step {self.step}: {json.dumps({k: summary[k] for k in list(summary)[:8]})}", flush=True)
        self._prof = None


class BenchTrainer(QwenVLTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        step = int(os.environ.get("BENCH_PROFILE_STEP", "0") or 0)
        if step > 0 and torch.cuda.is_available():
            self.add_callback(StepProfiler(step, Path(os.environ.get("BENCH_PROFILE_OUT", self.args.output_dir))))

    def save_model(self, output_dir=None, _internal_call=False):
        if os.environ.get("BENCH_NO_FINAL_SAVE") == "1" and not _internal_call:
            return None
        return super().save_model(output_dir, _internal_call=_internal_call)


if __name__ == "__main__":
    from qwenvl.train.train_qwen import train

    train(sys.argv[1:], trainer_class=BenchTrainer)
