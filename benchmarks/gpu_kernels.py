"""Do the packed-attention and chunked-loss kernels pay for themselves on a GPU?

(a) Attention, forward + backward, at the language-model shapes of Qwen2.5-VL-7B
    (28 query heads, 4 key/value heads, head_dim 128, bf16, causal) over one packed
    row of 4k / 8k / 16k tokens made of samples of random lengths:
    * ``varlen``: qwenvl.train.attention's function on ``torch.nn.attention.varlen``;
    * ``sdpa+mask``: what transformers' SDPA path does with a flattened batch: key/value
      heads repeated, a (1, 1, T, T) block-diagonal causal mask;
    * ``fa2``: flash_attn.flash_attn_varlen_func, when flash-attn is installed.
(b) Loss of the lm_head, forward + backward, 16k tokens x 3584 hidden x 152064 vocab in
    bf16, a quarter of the labels ignored (prompt tokens):
    * ``plain``: logits = hidden @ W.T, upcast to fp32, F.cross_entropy (as transformers' loss);
    * ``chunked``: qwenvl.train.loss.chunked_linear_cross_entropy;
    * ``liger``: LigerFusedLinearCrossEntropyLoss, when liger-kernel is installed.

Times are medians of CUDA-event timings after warm-up; peak memory is
``torch.cuda.max_memory_allocated`` above what the inputs already hold.  Prints a table
last and writes JSON to --output (default: $OUT/gpu_kernels.json when $OUT is set, else
benchmarks/results/gpu_kernels.json).

    python benchmarks/gpu_kernels.py [--tokens 4096 8192 16384] [--iters 10] [--skip-loss]
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere, without installing the package

from qwenvl.train import attention as attn  # noqa: E402
from qwenvl.train.loss import chunked_linear_cross_entropy, default_chunk_size  # noqa: E402

GiB = 2**30


def timed(fn, warmup: int, iters: int) -> tuple[float, float]:
    """(median milliseconds, peak GiB above the memory held before) of ``fn()``."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / GiB


def measure(fn, warmup, iters) -> dict:
    try:
        ms, peak = timed(fn, warmup, iters)
        return {"ms": round(ms, 3), "peak_gib": round(peak, 3)}
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"ms": None, "peak_gib": None, "error": "out of memory"}


# -- (a) attention -------------------------------------------------------------------------
class _Layer(torch.nn.Module):
    """What an attention function reads from its module."""

    is_causal = True
    num_key_value_groups = 7


def sample_lengths(total: int, gen: torch.Generator, low: int = 64, high: int = 2048) -> list[int]:
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(low, high + 1, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def bench_attention(total: int, args, heads=28, kv_heads=4, head_dim=128) -> dict:
    gen = torch.Generator().manual_seed(total)
    lengths = sample_lengths(total, gen)
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(1, heads, total, head_dim, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(1, kv_heads, total, head_dim, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(1, kv_heads, total, head_dim, device=dev, dtype=dt, requires_grad=True)
    grad = torch.randn(1, total, heads, head_dim, device=dev, dtype=dt)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(dev)
    scale = 1 / math.sqrt(head_dim)
    layer = _Layer()
    results = {"tokens": total, "samples": len(lengths), "max_len": max(lengths)}

    def backward(out):
        torch.autograd.backward(out, grad)
        q.grad = k.grad = v.grad = None

    kernel = attn.torch_varlen_kernel()
    if kernel is not None:
        fn = attn.make_attention_forward(kernel)
        results["varlen"] = measure(
            lambda: backward(fn(layer, q, k, v, None, scaling=scale, position_ids=positions)[0]),
            args.warmup, args.iters)

    segments = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(dev)
    mask = (segments[:, None] == segments[None, :]).tril_()[None, None]  # built once, as per forward in a model

    def sdpa():
        kr, vr = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
        out = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, scale=scale).transpose(1, 2)
        backward(out)

    results["sdpa+mask"] = measure(sdpa, args.warmup, args.iters)
    del mask

    if importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_varlen_func

        cu = F.pad(torch.tensor(lengths, device=dev).cumsum(0), (1, 0)).to(torch.int32)

        def fa2():
            out = flash_attn_varlen_func(q.transpose(1, 2)[0], k.transpose(1, 2)[0], v.transpose(1, 2)[0], cu, cu,
                                         max(lengths), max(lengths), softmax_scale=scale, causal=True)
            backward(out[None])

        results["fa2"] = measure(fa2, args.warmup, args.iters)
    return results


# -- (b) loss ---------------------------------------------------------------------------------
def bench_loss(args, n=16384, hidden=3584, vocab=152064) -> dict:
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(n, hidden, device=dev, dtype=dt, generator=gen).requires_grad_()
    w = (torch.randn(vocab, hidden, device=dev, dtype=dt, generator=gen) / hidden**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (n,), device=dev, generator=gen)
    labels[torch.rand(n, device=dev, generator=gen) < 0.25] = -100
    results = {"tokens": n, "hidden": hidden, "vocab": vocab, "chunk_size": default_chunk_size(vocab)}

    def run(loss_fn):
        loss_fn().backward()
        h.grad = w.grad = None

    def plain():
        logits = (h @ w.T).float()
        return F.cross_entropy(logits, labels, ignore_index=-100)

    results["plain"] = measure(lambda: run(plain), args.warmup, args.iters)
    results["chunked"] = measure(lambda: run(lambda: chunked_linear_cross_entropy(h, w, labels, reduction="mean")),
                                 args.warmup, args.iters)
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")

        def liger_loss():
            out = liger(w, h, labels)
            return out[0] if isinstance(out, (tuple, list)) else out

        results["liger"] = measure(lambda: run(liger_loss), args.warmup, args.iters)

    # Agreement, so a fast wrong kernel cannot win the table.
    with torch.no_grad():
        ref = F.cross_entropy((h @ w.T).float(), labels, ignore_index=-100)
        ours = chunked_linear_cross_entropy(h, w, labels, reduction="mean")
    results["chunked_minus_plain_loss"] = float(ours - ref)
    return results


# -- report -----------------------------------------------------------------------------------
def environment() -> dict:
    import transformers

    kernel = attn.torch_varlen_kernel()
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "varlen_attn": str(inspect.signature(kernel.fn)) if kernel else None,
        "flash_attn": importlib.util.find_spec("flash_attn") is not None,
        "liger_kernel": importlib.util.find_spec("liger_kernel") is not None,
    }


def _cell(entry) -> str:
    if entry is None:
        return "-"
    if entry.get("error"):
        return entry["error"]
    return f"{entry['ms']:.2f} ms / {entry['peak_gib']:.2f} GiB"


def table(result: dict) -> str:
    env = result["env"]
    lines = [f"{env['gpu']}, torch {env['torch']}, transformers {env['transformers']}", ""]
    lines.append("(a) attention fwd+bwd, 28 q heads / 4 kv heads / head_dim 128, bf16, causal, packed")
    lines.append(f"{'tokens':>7} {'samples':>8} | {'varlen':>22} | {'sdpa+mask':>22} | {'fa2':>22}")
    for r in result["attention"]:
        lines.append(f"{r['tokens']:>7} {r['samples']:>8} | {_cell(r.get('varlen')):>22} | "
                     f"{_cell(r.get('sdpa+mask')):>22} | {_cell(r.get('fa2')):>22}")
    if result.get("loss"):
        r = result["loss"]
        lines += ["", f"(b) lm_head loss fwd+bwd, {r['tokens']} tokens x {r['hidden']} x {r['vocab']}, bf16 "
                      f"(chunk {r['chunk_size']} rows; chunked - plain loss = {r['chunked_minus_plain_loss']:.2e})"]
        for name in ("plain", "chunked", "liger"):
            lines.append(f"  {name:>8}: {_cell(r.get(name))}")
    return "\n".join(lines)


def default_output() -> str:
    out = os.environ.get("OUT")
    return os.path.join(out, "gpu_kernels.json") if out else str(REPO / "benchmarks" / "results" / "gpu_kernels.json")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--skip-loss", action="store_true")
    parser.add_argument("--output", default=default_output())
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_kernels.py needs a CUDA GPU")

    result = {"env": environment(), "attention": [bench_attention(t, args) for t in args.tokens]}
    if not args.skip_loss:
        result["loss"] = bench_loss(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.output}\n")
    print(table(result))


if __name__ == "__main__":
    main()
