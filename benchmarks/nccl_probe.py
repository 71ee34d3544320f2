"""All-gather and reduce-scatter bandwidth between the GPUs of one node, at FSDP2's message sizes.

    torchrun --nproc_per_node 2 -m benchmarks.nccl_probe --out DIR

FSDP2 issues one all-gather per wrapped unit in the forward (and again in the backward when
it reshards after the forward) and one reduce-scatter per unit after the backward; a unit's
message is its parameters in the all-gather dtype (bf16) and its gradients in the reduce
dtype.  A Qwen2.5-VL-7B decoder layer is 233M parameters (466 MB in bf16), a 32B layer 0.98B
(1.96 GB), a 72B layer 0.97B; the vision blocks 21M.  For each size (the whole message, as
FSDP2's all-gather output and reduce-scatter input) and dtype this times 20 calls after 5
warm-ups with CUDA events and reports the algorithm bandwidth (message bytes / time) and the
bus bandwidth (x (n-1)/n, NCCL's convention for both collectives: what each GPU's links
carry).  Rank 0 writes ``nccl_probe.json``.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

SIZES_MB = (8, 42, 128, 466, 1024, 1960)


def time_collective(fn, iters: int = 20, warmup: int = 5) -> float:
    """Mean seconds per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = parser.parse_args(argv)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for mb in SIZES_MB:
            numel = (mb * 2**20 // dtype.itemsize) // world * world
            full = torch.empty(numel, dtype=dtype, device="cuda")
            shard = torch.empty(numel // world, dtype=dtype, device="cuda")
            gather = time_collective(lambda: dist.all_gather_into_tensor(full, shard))
            scatter = time_collective(lambda: dist.reduce_scatter_tensor(shard, full))
            size = numel * dtype.itemsize
            for op, sec in (("all_gather", gather), ("reduce_scatter", scatter)):
                rows.append({"op": op, "dtype": str(dtype).replace("torch.", ""), "message_mb": round(size / 2**20),
                             "ms": round(sec * 1e3, 3), "algbw_gbs": round(size / sec / 1e9, 1),
                             "busbw_gbs": round(size / sec / 1e9 * (world - 1) / world, 1)})
    if rank == 0:
        for r in rows:
            print(f"{r['op']:>15} {r['dtype']:>9} {r['message_mb']:>6} MB  {r['ms']:>8.3f} ms  "
                  f"algbw {r['algbw_gbs']:>6.1f} GB/s  busbw {r['busbw_gbs']:>6.1f} GB/s", flush=True)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "nccl_probe.json").write_text(json.dumps({"world": world, "device": torch.cuda.get_device_name(0),
                                                         "torch": torch.__version__, "rows": rows}, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
