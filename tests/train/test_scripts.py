"""The launcher and the sft*.sh wrappers: the command they build, and that our parser accepts it."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from qwenvl.train.arguments import parse_args

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ["sft.sh", "sft_7b.sh", "sft_32b.sh", "sft_qwen3_4b.sh", "sft_qwen3_8b.sh", "sft_qwen3_30b_a3b.sh"]


def dry_run(script: str, *args: str, **env) -> list[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("NPROC_PER_NODE", "MASTER_PORT", "PRECISION")}
    full_env.update(DRY_RUN="1", **env)
    result = subprocess.run(["bash", f"scripts/{script}", *args], cwd=REPO, env=full_env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def _train_args(cmd: list[str]) -> list[str]:
    """The flags after train_qwen.py, without --deepspeed (its config is checked separately)."""
    args = cmd[cmd.index(str(REPO / "qwenvl/train/train_qwen.py")) + 1:]
    while "--deepspeed" in args:
        i = args.index("--deepspeed")
        del args[i:i + 2]
    return args


def _value(cmd: list[str], flag: str) -> str | None:
    """The last value given for ``flag`` (the one argparse keeps), or None."""
    positions = [i for i, part in enumerate(cmd) if part == flag]
    return cmd[positions[-1] + 1] if positions else None


def test_launch_builds_torchrun_with_environment_and_passes_flags_last(tmp_path):
    cmd = dry_run("launch.sh", "--learning_rate", "3e-5", MODEL_PATH="/m", DATASETS="demo_shapes",
                  OUTPUT_DIR=str(tmp_path / "run"), NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1",
                  NPROC_PER_NODE="8")
    assert cmd[0] == "torchrun"
    joined = " ".join(cmd)
    for part in ("--nproc_per_node 8", "--nnodes 2", "--node_rank 1", "--master_addr 10.0.0.1",
                 "--master_port 29500", "--model_name_or_path /m", "--dataset_use demo_shapes",
                 f"--output_dir {tmp_path / 'run'}", "--run_name run"):
        assert part in joined, part
    assert cmd[-2:] == ["--learning_rate", "3e-5"]
    # one node: a free port, and fp32 on a machine without GPUs (PRECISION=auto)
    single = dry_run("launch.sh", MODEL_PATH="/m", DATASETS="d")
    port = int(single[single.index("--master_port") + 1])
    assert 1024 < port < 65536 and "--nproc_per_node" in single
    if subprocess.run(["bash", "-c", "command -v nvidia-smi"], capture_output=True).returncode != 0:
        assert single[single.index("--nproc_per_node") + 1] == "1"
        assert "--bf16 False --fp16 False" in " ".join(single)
    assert "--fp16 True --bf16 False" in " ".join(dry_run("launch.sh", MODEL_PATH="/m", DATASETS="d",
                                                          PRECISION="fp16"))


def test_launch_requires_model_and_data():
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "DATASETS")}
    result = subprocess.run(["bash", "scripts/launch.sh"], cwd=REPO, env=dict(env, DRY_RUN="1"),
                            capture_output=True, text=True)
    assert result.returncode != 0 and "MODEL_PATH" in result.stderr


# The official batch size x accumulation of each recipe, and the sharding its fast path uses.
OFFICIAL = {"sft.sh": (4, 4, "zero2"), "sft_7b.sh": (4, 4, "zero2"), "sft_32b.sh": (2, 8, "fsdp2"),
            "sft_qwen3_4b.sh": (4, 4, "zero2"), "sft_qwen3_8b.sh": (4, 4, "zero2"),
            "sft_qwen3_30b_a3b.sh": (1, 4, "fsdp2")}


def _official_settings(model, data, training):
    assert model.tune_mm_llm and model.tune_mm_mlp and not model.tune_mm_vision and data.data_flatten
    assert (data.max_pixels, data.min_pixels, training.model_max_length) == (50176, 784, 8192)
    assert training.warmup_steps == 0.03 and training.weight_decay == 0 and training.num_train_epochs == 0.5
    assert training.lr_scheduler_type == "cosine" and training.max_grad_norm == 1 and training.save_steps == 1000
    assert model.model_name_or_path.startswith(("Qwen/Qwen2.5-VL", "Qwen/Qwen3-VL"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_sft_scripts_are_fast_by_default_with_the_official_samples_per_step(script, tmp_path):
    """FAST=1 (default): one token-budget micro-batch per step holding batch x accumulation samples on
    average, compiled layers instead of checkpointing, the script's sharding; official optimisation."""
    batch, accumulation, sharding = OFFICIAL[script]
    cmd = dry_run(script, DATASETS="demo_shapes", OUTPUT_DIR=str(tmp_path / "out"))
    if sharding == "fsdp2":
        assert "--deepspeed" not in cmd and _value(cmd, "--fsdp") == "full_shard auto_wrap"
        assert Path(_value(cmd, "--fsdp_config")) == REPO / "scripts" / "fsdp2.json"
    else:
        assert Path(_value(cmd, "--deepspeed")).name == "zero2.json" and "--fsdp" not in cmd
    model, data, training, _ = parse_args(_train_args(cmd))
    _official_settings(model, data, training)
    assert training.token_budget_samples == batch * accumulation and training.gradient_accumulation_steps == 1
    assert training.compile_layers and training.activation_memory_budget == 0.5
    assert not training.gradient_checkpointing
    assert training.optim == "adamw_torch_fused"  # the official AdamW in one kernel per group
    assert training.learning_rate == (1e-5 if "qwen3" in script else 2e-7)


@pytest.mark.parametrize("script", SCRIPTS)
def test_sft_scripts_official_batching_one_flag_away_and_user_flags_win(script, tmp_path):
    batch, accumulation, _ = OFFICIAL[script]
    cmd = dry_run(script, "--learning_rate", "1e-6", "--tune_mm_vision", "True", DATASETS="demo_shapes",
                  OUTPUT_DIR=str(tmp_path / "out"), FAST="0")
    deepspeed = Path(_value(cmd, "--deepspeed"))
    assert deepspeed.is_file() and deepspeed.name == ("zero2.json" if "30b" in script else "zero3.json")
    assert "--fsdp" not in cmd
    model, data, training, _ = parse_args(_train_args(cmd))
    assert training.learning_rate == 1e-6 and model.tune_mm_vision  # the user's values
    model.tune_mm_vision = False
    _official_settings(model, data, training)
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps) == (batch, accumulation)
    assert training.gradient_checkpointing and not training.compile_layers
    assert training.token_budget_samples is None and training.max_tokens_per_batch is None
    assert training.optim == "adamw_torch"  # the official optimizer implementation


def test_sft_zero3_keeps_the_token_budget_without_compiled_layers(tmp_path):
    cmd = dry_run("sft_7b.sh", DATASETS="demo_shapes", OUTPUT_DIR=str(tmp_path / "out"), SHARDING="zero3",
                  BUDGET_ACCUM_STEPS="2")
    assert Path(_value(cmd, "--deepspeed")).name == "zero3.json"
    _, _, training, _ = parse_args(_train_args(cmd))
    assert training.token_budget_samples == 16 and training.gradient_accumulation_steps == 2
    assert training.gradient_checkpointing and not training.compile_layers
    assert training.optim == "adamw_torch"  # zero3's offload configs step the optimizer on the CPU


@pytest.mark.parametrize("env", [{"SHARDING": "ddp"}, {"FAST": "2"}])
def test_sft_scripts_refuse_unknown_settings(env, tmp_path):
    full_env = dict(os.environ, DRY_RUN="1", DATASETS="d", OUTPUT_DIR=str(tmp_path), **env)
    result = subprocess.run(["bash", "scripts/sft_7b.sh"], cwd=REPO, env=full_env, capture_output=True, text=True)
    assert result.returncode == 2 and list(env)[0] in result.stderr


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json", "zero3_offload_optimizer.json"])
def test_deepspeed_configs(name):
    config = json.loads((REPO / "scripts" / name).read_text())
    stage = config["zero_optimization"]["stage"]
    assert stage == (2 if name == "zero2.json" else 3)
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    # No optimizer/scheduler section: the Trainer builds ours, keeping the per-component groups.
    assert "optimizer" not in config and "scheduler" not in config
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_launch_without_the_environment_says_what_to_do(tmp_path):
    """Without the virtual environment on PATH: a clear message, not "torchrun: not found"."""
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("bash", "dirname", "basename", "grep"):  # what the script needs before it looks for torchrun
        found = shutil.which(tool)
        if found:
            (bare / tool).symlink_to(found)
    env = {"PATH": str(bare), "MODEL_PATH": "/m", "DATASETS": "d", "HOME": str(tmp_path)}
    result = subprocess.run([str(bare / "bash"), "scripts/launch.sh"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 127
    assert "torchrun not found" in result.stderr and ".venv/bin/activate" in result.stderr
    assert "command not found" not in result.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has GPUs")
def test_launch_on_a_machine_without_gpu_says_it_trains_on_the_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC_PER_NODE", "MASTER_PORT", "PRECISION")}
    result = subprocess.run(["bash", "scripts/sft_7b.sh"], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env=dict(env, DRY_RUN="1", DATASETS="demo_shapes", OUTPUT_DIR=str(tmp_path / "o")))
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU visible" in result.stderr and "training runs on the CPU" in result.stderr
