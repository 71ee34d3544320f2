"""Where a training step's time goes, on one GPU: data loading vs forward/backward vs optimizer.

    python -m benchmarks.step_anatomy [--model 3b] [--batch 16] [--steps 6] [--output FILE]

Uses the same model build and generated data as ``train_throughput.py`` (released
Qwen2.5-VL architecture, random weights, reference data), then measures separately:

- the data loader alone (our dataset + flattened collator, ``--num_workers`` workers);
- one optimizer step on pre-loaded batches (no loader), for precision layouts
  (fp32 trainable weights under bf16 autocast, as the trainer does without DeepSpeed;
  pure bf16) with and without gradient checkpointing, timing forward+backward and the
  optimizer step apart.

Prints a table last and writes JSON.  GPU only.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def _time(fn, device="cuda"):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(argv=None):
    from transformers import AutoConfig, AutoProcessor

    from benchmarks.bench_data import generate
    from benchmarks.train_throughput import write_model_dir
    from qwenvl.data.arguments import DataArguments
    from qwenvl.data.dataset import make_supervised_data_module
    from qwenvl.train.attention import choose_attn_implementation
    from qwenvl.train.fused_loss import with_training_forward
    from qwenvl.train.model import model_class_for

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="3b")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--num_workers", type=int, default=8)
    p.add_argument("--output", default=os.path.join(os.environ.get("OUT", "benchmarks/results"), "step_anatomy.json"))
    a = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="anatomy-"))
    model_dir = write_model_dir(a.model, work / "model")
    data = generate(work / "data", samples=a.batch * (a.steps + 4), mode="reference", seed=0)
    dictionary = data.dictionary
    processor = AutoProcessor.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    args = DataArguments(dataset_use=data.name, dataset_dictionary=str(dictionary), data_flatten=True,
                         max_pixels=200704, min_pixels=3136)
    module = make_supervised_data_module(processor, args, config, model_max_length=8192, seed=0)
    dataset, collate = module["train_dataset"], module["data_collator"]
    rows = []

    # 1. the loader alone
    loader = torch.utils.data.DataLoader(dataset, batch_size=a.batch, shuffle=True, collate_fn=collate,
                                         num_workers=a.num_workers, persistent_workers=False)
    it = iter(loader)
    next(it)  # workers started
    start = time.perf_counter()
    batches = [next(it) for _ in range(a.steps)]
    load_s = (time.perf_counter() - start) / a.steps
    rows.append({"what": f"data loader ({a.num_workers} workers)", "s_per_batch": load_s,
                 "samples_per_s": a.batch / load_s})
    print(f"loader: {load_s:.3f} s per batch of {a.batch}", flush=True)
    gpu_batches = [{k: (v.cuda(non_blocking=True) if torch.is_tensor(v) else v) for k, v in b.items()}
                   for b in batches]

    attn = choose_attn_implementation(None, device_is_cuda=True)
    cls = with_training_forward(model_class_for("qwen2_5_vl"), fused_loss=True)
    import gc

    for layout in ("bf16", "fp32_master_autocast"):
        for checkpointing in (True, False):
            try:
                rows.append(_variant(cls, config, attn, layout, checkpointing, gpu_batches, a.batch))
            except torch.OutOfMemoryError:
                rows.append({"what": f"{layout}, checkpointing {'on' if checkpointing else 'off'}: out of memory",
                             "samples_per_s": 0.0})
            print(rows[-1], flush=True)
            gc.collect()
            torch.cuda.empty_cache()

    write(a, attn, rows)


def _variant(cls, config, attn, layout, checkpointing, gpu_batches, batch_size):
    from qwenvl.hf_internals import build_from_config
    from qwenvl.train.attention import apply_attn_implementation, loadable_attn_implementation

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build_from_config(cls, config, dtype=torch.bfloat16,
                                  attn_implementation=loadable_attn_implementation(attn))
    apply_attn_implementation(model, attn)
    model.config.use_cache = False
    for name, param in model.named_parameters():
        trainable = not name.startswith("model.visual.") or ".merger." in name
        param.requires_grad_(trainable)
        if trainable and layout == "fp32_master_autocast":
            param.data = param.data.float()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-5, fused=True)
    torch.cuda.reset_peak_memory_stats()
    fb, st = [], []
    for i, batch in enumerate(gpu_batches):
        def fwd_bwd():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=layout != "bf16"):
                loss = model(**batch).loss
            loss.backward()
            return loss
        t1, _ = _time(fwd_bwd)
        t2, _ = _time(lambda: (optim.step(), optim.zero_grad(set_to_none=True)))
        if i >= 2:
            fb.append(t1)
            st.append(t2)
    tokens = sum(int(b["input_ids"].shape[1]) for b in gpu_batches[2:]) / max(1, len(fb))
    row = {"what": f"{layout}, checkpointing {'on' if checkpointing else 'off'}",
           "fwd_bwd_s": sum(fb) / len(fb), "optimizer_s": sum(st) / len(st),
           "tokens_per_batch": tokens, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    row["samples_per_s"] = batch_size / (row["fwd_bwd_s"] + row["optimizer_s"])
    return row


def write(a, attn, rows):
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps({"model": a.model, "batch": a.batch, "attention": attn,
                                          "gpu": torch.cuda.get_device_name(), "rows": rows}, indent=2))
    print(f"\n{'what':42} {'fwd+bwd s':>10} {'optim s':>8} {'samples/s':>10} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['what']:42} {r.get('fwd_bwd_s', r.get('s_per_batch', 0)):10.3f} {r.get('optimizer_s', 0):8.3f} "
              f"{r['samples_per_s']:10.2f} {r.get('peak_gib', 0):9.1f}")


if __name__ == "__main__":
    main()
