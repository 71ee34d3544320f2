"""Sharded training side by side on one multi-GPU node (written for 2x H200), through scripts/launch.sh.

    python -m benchmarks.sharded_throughput [--runs all] [--deadline 480] [--steps 8] [--out DIR]
    bash benchmarks/sharded_throughput.sh            # the same, installing carried wheels first

Questions (issue 14), each a named run (``--runs`` picks some, in this order of priority):

* ``zero2``: the unsharded fast path: released Qwen2.5-VL-7B architecture (random weights),
  DeepSpeed ZeRO-2, compiled layers, activation budget 0.5, no checkpointing, 16k-token
  micro-batches, fused loss.
* ``fsdp2_fused``: the same under FSDP2 (``scripts/fsdp2.json``: gradients reduced in bf16 as
  ZeRO-2 does, frozen vision tower replicated) with the fused loss; the process must exit
  promptly after saving (``exit_s``).
* ``fsdp2_fused_prev``: the same with the previous session's FSDP2 settings
  (``benchmarks/fsdp2_fp32_reduce.json``: float32 reduction, vision tower sharded), to
  attribute the difference.
* ``fsdp2_model_loss``: FSDP2 with the released forward's loss (``--loss_kernel model``): the
  peak memory to compare with ``fsdp2_fused``.
* ``sft_7b``: ``bash scripts/sft_7b.sh`` at its defaults (only ``--max_steps``, saving and
  reporting overridden); ``sft_7b_fsdp2``: the same with ``SHARDING=fsdp2``.
* ``ddp_vs_fsdp2``: the 7B architecture at 7 of 28 layers, 20 steps, DDP (float32 master
  weights, no sharding) then FSDP2, same data and seed: the loss curves side by side.
  ``ddp_vs_fsdp2_fp32``: the control, DDP again and FSDP2 reducing gradients in float32
  (``benchmarks/fsdp2_fp32_reduce.json``); every ``*_l7`` run's losses are compared with ``ddp_l7``'s.
* ``32b_quarter``: Qwen2.5-VL-32B widths at 16 of 64 layers under FSDP2, compiled, 16k.
* ``30b_a3b``: Qwen3-VL-30B-A3B widths at 12 of 48 layers under FSDP2, compiled, 16k.
* ``--variant LABEL=RUN [NAME=VALUE ...] [FLAGS]``: a further run, RUN's command with FLAGS
  appended (last value wins) and the environment set, named LABEL in ``--runs``, e.g.
  ``--variant "sft_7b_fused_optim=sft_7b --optim adamw_torch_fused"``.
* ``nccl``: ``benchmarks/nccl_probe.py``: all-gather / reduce-scatter bandwidth at FSDP2's
  message sizes (for the scaling arithmetic in RESULTS.md).

Every run starts ``benchmarks/profiled_train.py`` under torchrun (the ``sft_7b`` runs with the exact
command their recipe script builds, read from ``scripts/launch.sh``'s ``DRY_RUN=1``, with
``train_qwen.py`` swapped for ``-m benchmarks.profiled_train``): ``train_qwen`` with the product's trainer,
plus, for the runs named in ``--profile``, ``torch.profiler`` over one late optimizer step
(its summary lands in the run's JSON entry under ``profile``), and without the final model
save except for the runs named in ``--save`` (the save is what ``exit_s`` times).

Data: ``benchmarks/bench_data.py`` ``reference`` (one image per sample, about 430 tokens).
Per run: tokens/s per GPU (median of the trainer's per-step ``tokens_per_second`` after the
warm-up steps, divided by the GPU count), an MFU estimate (6 x active language-model matmul
parameters x tokens/s per GPU / the GPU's dense bf16 peak: attention and the vision tower
left out, so a lower bound; MoE counts active experts only), peak GPU memory (nvidia-smi,
sampled every 0.5 s: what the allocator reserved), the seconds from "model and processor
saved" to the process's exit, and the exit status.  ``--deadline`` (seconds) skips the runs
that would start after it, so the whole command ends inside one device call; run the rest
with ``--runs``.  Writes ``sharded_throughput.json`` and ``sharded_throughput.md`` to
``--out`` (default ``$OUT``) and the logs of each run next to them.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RUNS = ("zero2", "fsdp2_fused", "fsdp2_fused_prev", "fsdp2_model_loss", "sft_7b", "sft_7b_fsdp2", "ddp_vs_fsdp2",
        "ddp_vs_fsdp2_fp32", "32b_quarter", "30b_a3b", "nccl")
FSDP = ["--fsdp", "full_shard auto_wrap", "--fsdp_config", str(REPO / "scripts" / "fsdp2.json")]
FSDP_PREV = ["--fsdp", "full_shard auto_wrap", "--fsdp_config", str(REPO / "benchmarks" / "fsdp2_fp32_reduce.json")]
BENCH = "BENCH"  # command placeholder: torchrun -m benchmarks.profiled_train over the node's GPUs (expand_command)
RECIPE = "RECIPE"  # placeholder: the recipe script's own torchrun command (DRY_RUN=1), run through profiled_train
COMPILED = ["--compile_layers", "True", "--activation_memory_budget", "0.5", "--gradient_checkpointing", "False"]
BUDGET = ["--max_tokens_per_batch", "16384"]
# model folder name -> (architecture, decoder layers or None for all)
MODELS = {"7b": ("7b", None), "7b_l7": ("7b", 7), "32b_l16": ("32b", 16), "30b_a3b_l12": ("30b_a3b", 12)}
RUN_MODEL = {"zero2": "7b", "fsdp2_fused": "7b", "fsdp2_fused_prev": "7b", "fsdp2_model_loss": "7b", "sft_7b": "7b", "sft_7b_fsdp2": "7b",
             "ddp_vs_fsdp2": "7b_l7", "ddp_vs_fsdp2_fp32": "7b_l7", "32b_quarter": "32b_l16", "30b_a3b": "30b_a3b_l12", "nccl": None}


def common_flags(steps: int) -> list[str]:
    return ["--tune_mm_llm", "True", "--tune_mm_mlp", "True", "--tune_mm_vision", "False", "--data_flatten", "True",
            "--max_steps", str(steps), "--learning_rate", "1e-5", "--lr_scheduler_type", "constant",
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "4",
            "--disable_tqdm", "True", "--max_pixels", "200704", "--min_pixels", "3136", "--seed", "0"]


def run_plan(name: str, steps: int) -> list[tuple[str, list[str], dict]]:
    """[(label, command, extra environment)] of one named run."""
    launch = [BENCH]
    flags = common_flags(steps)
    if name == "zero2":
        return [(name, launch + flags + ["--deepspeed", str(REPO / "scripts" / "zero2.json")] + COMPILED + BUDGET, {})]
    if name == "fsdp2_fused":
        return [(name, launch + flags + FSDP + COMPILED + BUDGET + ["--loss_kernel", "fused"], {})]
    if name == "fsdp2_fused_prev":
        return [(name, launch + flags + FSDP_PREV + COMPILED + BUDGET + ["--loss_kernel", "fused"], {})]
    if name == "nccl":
        return [(name, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "{gpus}",
                        "--master_port", "{port}", "-m", "benchmarks.nccl_probe", "--out", "{out}"], {})]
    if name == "fsdp2_model_loss":
        return [(name, launch + flags + FSDP + COMPILED + BUDGET + ["--loss_kernel", "model"], {})]
    if name in ("sft_7b", "sft_7b_fsdp2"):
        return [(name, [RECIPE, str(REPO / "scripts" / "sft_7b.sh"), "--max_steps", str(steps), "--save_strategy", "no",
                        "--report_to", "none", "--logging_steps", "1", "--disable_tqdm", "True"],
                 {"SHARDING": "fsdp2"} if name == "sft_7b_fsdp2" else {})]
    if name == "ddp_vs_fsdp2":
        twenty = common_flags(20) + COMPILED + BUDGET
        return [("ddp_l7", launch + twenty, {}), ("fsdp2_l7", launch + twenty + FSDP, {})]
    if name == "ddp_vs_fsdp2_fp32":  # the control: is the bf16 reduce-scatter what separates the curves?
        twenty = common_flags(20) + COMPILED + BUDGET
        return [("ddp_l7", launch + twenty, {}), ("fsdp2_fp32_l7", launch + twenty + FSDP_PREV, {})]
    if name in ("32b_quarter", "30b_a3b"):
        return [(name, launch + flags + FSDP + COMPILED + BUDGET, {})]
    raise ValueError(f"unknown run {name!r}; runs: {', '.join(RUNS)}")


def planned_runs(name: str, steps: int, variants: dict) -> list[tuple[str, list[str], dict]]:
    """``run_plan`` of a named run or of a variant (its base run's commands, relabelled, with the
    variant's flags appended and its environment added)."""
    if name not in variants:
        return run_plan(name, steps)
    base, env, flags = variants[name]
    plan = run_plan(base, steps)
    return [(name if len(plan) == 1 else f"{name}_{label}", cmd + flags, dict(extra, **env))
            for label, cmd, extra in plan]


def parse_variant(spec: str) -> tuple[str, str, dict, list[str]]:
    """``"LABEL=RUN [NAME=VALUE ...] [--flag value ...]"`` -> (label, base run, environment, extra flags).

    A variant is a named run with the base run's command plus flags appended (they come last, so
    they override) and environment variables set (upper-case ``NAME=VALUE`` words before the flags,
    e.g. ``SHARDING=fsdp2`` for a recipe script)."""
    label, sep, rest = spec.partition("=")
    words = shlex.split(rest)
    if not sep or not label.strip() or not words:
        raise ValueError(f"--variant {spec!r}: expected LABEL=RUN [NAME=VALUE ...] [--flag value ...]")
    base, words = words[0], words[1:]
    if base not in RUNS:
        raise ValueError(f"--variant {spec!r}: unknown run {base!r}; runs: {', '.join(RUNS)}")
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return label.strip(), base, env, words


def recipe_command(cmd: list[str], env: dict) -> list[str]:
    """The torchrun command a recipe script (``cmd[1:]``: the script and its flags) would run, from its
    ``DRY_RUN=1`` output, with ``train_qwen.py`` replaced by ``-m benchmarks.profiled_train`` (the same
    training, plus the optional profiled step) and ``torchrun`` by this interpreter's."""
    dry = subprocess.run(["bash", *cmd[1:]], cwd=REPO, env=dict(env, DRY_RUN="1"), capture_output=True, text=True,
                         check=True)
    words = shlex.split(dry.stdout.strip().splitlines()[-1])
    script = str(REPO / "qwenvl" / "train" / "train_qwen.py")
    if words[0] != "torchrun" or script not in words:
        raise RuntimeError(f"unexpected DRY_RUN output of {' '.join(cmd[1:])}: {dry.stdout[-500:]}")
    i = words.index(script)
    return [sys.executable, "-m", "torch.distributed.run", *words[1:i], "-m", "benchmarks.profiled_train",
            *words[i + 1:]]


def expand_command(cmd: list[str], gpus: int, model_dir: Path | None, dataset: str, output_dir: Path,
                   label: str) -> list[str]:
    """``cmd`` with BENCH replaced by torchrun over ``gpus`` GPUs running ``benchmarks.profiled_train``
    with the flags ``scripts/launch.sh`` would add (model, data, output folder, run name, bf16), and
    ``{gpus}`` / ``{port}`` / ``{out}`` filled in."""
    port = str(_free_port())
    if cmd and cmd[0] == BENCH:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "--master_port", port,
               "-m", "benchmarks.profiled_train", "--model_name_or_path", str(model_dir), "--dataset_use", dataset,
               "--output_dir", str(output_dir), "--run_name", label, "--bf16", "True", "--fp16", "False", *cmd[1:]]
    return [c.replace("{gpus}", str(gpus)).replace("{port}", port).replace("{out}", str(output_dir)) for c in cmd]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MemorySampler:
    """Peak memory.used (MiB) per GPU from nvidia-smi, sampled every 0.5 s while running."""

    def __init__(self):
        self.peak: dict[int, int] = {}
        self._proc = None
        self._thread = None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits",
                                           "-lms", "500"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            try:
                index, used = (int(x) for x in line.strip().split(","))
            except ValueError:
                continue
            self.peak[index] = max(self.peak.get(index, 0), used)

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()


def parse_logs(lines: list[str]) -> list[dict]:
    """The trainer's per-step log dicts (printed as Python dicts of strings) with float values."""
    logs = []
    for line in lines:
        line = line.strip()
        if not (line.startswith("{'loss'") or line.startswith("{\"loss\"")):
            continue
        try:
            entry = ast.literal_eval(line)
        except (ValueError, SyntaxError):
            continue
        out = {}
        for key, value in entry.items():
            try:
                out[key] = float(value)
            except (TypeError, ValueError):
                pass
        logs.append(out)
    return logs


def run_one(label: str, cmd: list[str], env: dict, out: Path, timeout: float) -> dict:
    """Run a training command; its log, step logs, memory peak and exit timing."""
    log_path = out / f"{label}.log"
    start = time.time()
    saved_at = None
    lines: list[str] = []
    with MemorySampler() as memory, open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
        timer.start()
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            if saved_at is None and "model and processor saved" in line:
                saved_at = time.time()
        rc = proc.wait()
        timer.cancel()
    end = time.time()
    return {"label": label, "rc": rc, "timed_out": end - start >= timeout, "wall_s": round(end - start, 1),
            "exit_s": round(end - saved_at, 1) if saved_at else None, "logs": parse_logs(lines),
            "peak_mib": memory.peak, "command": " ".join(cmd)}


def summarise(result: dict, gpus: int, warmup: int, active_matmul: int | None, peak_flops: float | None) -> dict:
    tps = [e["tokens_per_second"] for e in result["logs"] if "tokens_per_second" in e]
    timed = tps[warmup:] or tps[-1:]
    per_gpu = statistics.median(timed) / gpus if timed else None
    mfu = (6 * active_matmul * per_gpu / peak_flops) if (per_gpu and active_matmul and peak_flops) else None
    return {"tokens_per_s_per_gpu": round(per_gpu, 1) if per_gpu else None,
            "mfu_pct": round(100 * mfu, 1) if mfu else None,
            "peak_gib": round(max(result["peak_mib"].values()) / 1024, 1) if result["peak_mib"] else None,
            "losses": [e.get("loss") for e in result["logs"]], "steps_logged": len(result["logs"])}


def active_matmul_params(model_dir: Path) -> int | None:
    """Language-model matmul parameters a token passes through (active experts only; no input embedding)."""
    try:
        from transformers import AutoConfig

        from benchmarks.sharded_models import parameter_count
        from qwenvl.train.model import component_of  # noqa: F401 (the package must import)

        config = AutoConfig.from_pretrained(model_dir)
        _, active = parameter_count(config)
        text = config.text_config
        vision = config.vision_config
        from benchmarks.mfu import VisionShape

        vision_params = VisionShape.from_config(vision, config.model_type)
        visual_total = vision_params.patch_params + vision_params.merger_params
        return int(active - visual_total - text.vocab_size * text.hidden_size)
    except Exception as err:  # the estimate is optional
        print(f"(no MFU estimate: {err})", flush=True)
        return None


def loss_differences(runs: dict, reference: str) -> dict:
    """Per run with as many losses as ``reference`` (same steps, data and seed): the relative loss
    difference to it, step by step (max, the step of the max, median)."""
    want = runs.get(reference, {}).get("losses") or []
    out = {}
    for label, run in runs.items():
        got = run.get("losses") or []
        if label == reference or not want or len(got) != len(want) or None in got or None in want:
            continue
        rel = [abs(g - w) / abs(w) for g, w in zip(got, want)]
        worst = max(range(len(rel)), key=rel.__getitem__)
        out[label] = {"steps": len(rel), "max": rel[worst], "max_step": worst + 1, "median": statistics.median(rel),
                      "relative": rel}
    return out


def ensure_model(key: str, work: Path) -> Path:
    """The model folder of ``key`` under ``work``, written by a child process unless a previous call
    on this machine left it there.  A child, so that this process never holds GPU memory (it would
    count in every run's nvidia-smi peak)."""
    arch, layers = MODELS[key]
    folder = work / key
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors*")):
        return folder
    t = time.time()
    cmd = [sys.executable, "-m", "benchmarks.sharded_models", "--name", arch, "--output", str(folder)]
    if layers is not None:
        cmd += ["--layers", str(layers)]
    subprocess.run(cmd, cwd=REPO, check=True)
    print(f"[bench] wrote {key} in {time.time() - t:.0f} s", flush=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="all", help=f"comma list of: {', '.join(RUNS)} (or all)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per throughput run")
    parser.add_argument("--warmup", type=int, default=4, help="logged steps left out of the median (compilation)")
    parser.add_argument("--deadline", type=float, default=480, help="seconds after which no run starts")
    parser.add_argument("--run_timeout", type=float, default=300, help="seconds one training command may take")
    parser.add_argument("--hard_limit", type=float, default=550,
                        help="seconds after the start by which every command is stopped (a device call's limit)")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/sharded_throughput"))
    parser.add_argument("--work", default=None, help="where model folders go (default: /dev/shm if roomy, else /tmp)")
    parser.add_argument("--profile", default="zero2,fsdp2_fused,fsdp2_fused_prev",
                        help="labels whose step --steps - 1 runs under torch.profiler (summary in the JSON)")
    parser.add_argument("--save", default="fsdp2_fused",
                        help="labels that save the final model (the others skip it; exit_s times the exit after it)")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=RUN [NAME=VALUE ...] [FLAGS]",
                        help="a further run named LABEL: RUN's command with FLAGS appended and the environment "
                             "variables set, e.g. 'sft_7b_fused=sft_7b --optim adamw_torch_fused'; name it in --runs")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    try:
        variants = {label: (base, env, flags) for label, base, env, flags in map(parse_variant, args.variant)}
    except ValueError as err:
        parser.error(str(err))
    runs = list(RUNS) if args.runs == "all" else [r.strip() for r in args.runs.split(",") if r.strip()]
    for r in runs:
        if r not in RUNS and r not in variants:
            parser.error(f"unknown run {r!r}; runs: {', '.join(RUNS)}; variants: {', '.join(variants) or 'none'}")
    if args.dry_run:
        for r in runs:
            for label, cmd, env in planned_runs(r, args.steps, variants):
                model = RUN_MODEL[variants[r][0] if r in variants else r]
                if cmd[0] != RECIPE:
                    cmd = expand_command(cmd, 2, Path(f"<{model}>"), "<data>", Path(f"<out_{label}>"), label)
                print(f"{label}: MODEL_PATH=<{model}> {' '.join(f'{k}={v}' for k, v in env.items())} " + " ".join(cmd))
        return 0

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else (
        Path("/dev/shm/sharded_bench") if shutil.disk_usage("/dev/shm").free > 120 * 2**30 else Path("/tmp/sharded_bench"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    from benchmarks import bench_data
    from benchmarks.mfu import peak_bf16_flops

    gpus = torch.cuda.device_count()
    device_name = torch.cuda.get_device_name(0) if gpus else None
    peak = peak_bf16_flops(device_name)
    data_dir = work / "data"
    if (data_dir / "dataset_dictionary.json").is_file():  # a previous call's (seeded: the same files)
        data = bench_data.BenchData(root=data_dir, dictionary=data_dir / "dataset_dictionary.json",
                                    annotation=data_dir / "annotations.json")
    else:
        data = bench_data.generate(data_dir, samples=1024, mode="reference", seed=0)
    env = dict(os.environ, DATASETS=data.name, PRECISION="bf16", NPROC_PER_NODE=str(gpus), WANDB_MODE="offline",
               PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
    dictionary = ["--dataset_dictionary", str(data.dictionary)]
    results = {"device": device_name, "gpus": gpus, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "steps": args.steps, "warmup": args.warmup, "runs": {}, "skipped": []}
    written: dict[str, Path] = {}
    for name in runs:
        if time.time() - t0 > args.deadline:
            results["skipped"].append(name)
            continue
        model_key = RUN_MODEL[variants[name][0] if name in variants else name]
        if name == "nccl":
            label, cmd, _ = run_plan(name, args.steps)[0]
            cmd = expand_command(cmd, gpus, None, data.name, work / "nccl", label)
            probe = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
            print(probe.stdout[-4000:], probe.stderr[-2000:] if probe.returncode else "", flush=True)
            if (work / "nccl" / "nccl_probe.json").is_file():
                results["nccl_probe"] = json.loads((work / "nccl" / "nccl_probe.json").read_text())
            (out / "sharded_throughput.json").write_text(json.dumps(results, indent=2))
            continue
        if model_key not in written:
            written[model_key] = ensure_model(model_key, work)
        model_dir = written[model_key]
        matmul = active_matmul_params(model_dir)
        for label, cmd, extra in planned_runs(name, args.steps, variants):
            run_out = work / f"out_{label}"
            shutil.rmtree(run_out, ignore_errors=True)
            profile_dir = work / f"profile_{label}"
            shutil.rmtree(profile_dir, ignore_errors=True)
            run_env = dict(env, MODEL_PATH=str(model_dir), OUTPUT_DIR=str(run_out), RUN_NAME=label, **extra)
            if label in args.profile.split(","):
                run_env.update(BENCH_PROFILE_STEP=str(max(1, args.steps - 1)), BENCH_PROFILE_OUT=str(profile_dir))
            if label not in args.save.split(","):
                run_env["BENCH_NO_FINAL_SAVE"] = "1"
            if cmd[0] == RECIPE:  # the recipe's own command, through profiled_train
                cmd = recipe_command(cmd, run_env)
            else:
                cmd = expand_command(cmd, gpus, model_dir, data.name, run_out, label)
            print(f"[bench] {label} ...", flush=True)
            budget = min(args.run_timeout, args.hard_limit - (time.time() - t0))
            if budget < 60:
                results["skipped"].append(label)
                continue
            result = run_one(label, cmd + dictionary, run_env, out, budget)
            result.update(summarise(result, gpus, args.warmup, matmul, peak))
            result["saved"] = label in args.save.split(",")
            if (profile_dir / "profile_summary.json").is_file():
                result["profile"] = json.loads((profile_dir / "profile_summary.json").read_text())
                trace = profile_dir / "trace.json.gz"
                if label.startswith("fsdp2") and trace.is_file() and trace.stat().st_size < 15 * 2**20 \
                        and not any(out.glob("trace_*.json.gz")):
                    shutil.copy(trace, out / f"trace_{label}.json.gz")
            state = run_out / "trainer_state.json"
            if state.is_file():  # full-precision losses (the printed ones are rounded)
                result["losses"] = [e["loss"] for e in json.loads(state.read_text())["log_history"] if "loss" in e]
            result.pop("logs")
            results["runs"][label] = result
            print(f"[bench] {label}: rc {result['rc']}, {result['tokens_per_s_per_gpu']} tokens/s/GPU, "
                  f"MFU {result['mfu_pct']}%, peak {result['peak_gib']} GiB, exit {result['exit_s']} s after save, "
                  f"wall {result['wall_s']} s", flush=True)
            shutil.rmtree(run_out, ignore_errors=True)
            (out / "sharded_throughput.json").write_text(json.dumps(results, indent=2))
    results["loss_vs_ddp_l7"] = loss_differences(results["runs"], "ddp_l7")
    results["total_s"] = round(time.time() - t0, 1)
    (out / "sharded_throughput.json").write_text(json.dumps(results, indent=2))
    table = ["| run | rc | tokens/s/GPU | MFU % | peak GiB | exit after save (s) | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    for label, r in results["runs"].items():
        table.append(f"| {label} | {r['rc']} | {r['tokens_per_s_per_gpu']} | {r['mfu_pct']} | {r['peak_gib']} | "
                     f"{r['exit_s']} | {r['wall_s']} |")
    for label, diff in results["loss_vs_ddp_l7"].items():
        table.append(f"\n{label} against ddp_l7, {diff['steps']} steps: relative loss difference max "
                     f"{diff['max']:.4f} (step {diff['max_step']}), median {diff['median']:.4f}")
    if results["skipped"]:
        table.append(f"\nskipped (deadline): {', '.join(results['skipped'])}")
    (out / "sharded_throughput.md").write_text("\n".join(table) + "\n")
    print("\n".join(table), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
