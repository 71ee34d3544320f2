"""scripts/sft_qwen3_5_*.sh: the Qwen3.5 recipes' command lines parse with our parser, carry the published
recipe's settings and the sharding that fits each size, and start training on tiny Qwen3.5 models."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from qwenvl.train.arguments import parse_args

from tests.commands import run_command

from .test_scripts import REPO, _train_args, _value, dry_run

# script: (default model, sharding of the fast path, DeepSpeed config of FAST=0 / zero3, MoE)
RECIPES = {"sft_qwen3_5_9b.sh": ("Qwen/Qwen3.5-9B", "zero2", "zero3.json", False),
           "sft_qwen3_5_27b.sh": ("Qwen/Qwen3.5-27B", "fsdp2", "zero3.json", False),
           "sft_qwen3_5_35b_a3b.sh": ("Qwen/Qwen3.5-35B-A3B", "zero3", "zero3_offload_optimizer.json", True)}


def _recipe_settings(model, data, training, moe: bool):
    """ms-swift's published Qwen3.5 recipe (scripts/qwen3_5_recipe.sh names each source)."""
    assert model.tune_mm_llm and not model.tune_mm_mlp and not model.tune_mm_vision and data.data_flatten
    assert training.learning_rate == 1e-5 and training.num_train_epochs == 1 and training.warmup_steps == 0.05
    assert training.lr_scheduler_type == "cosine_with_min_lr" and training.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert (data.max_pixels, training.model_max_length) == (1003520, 16384)
    assert data.video_max_frames == 12  # ms-swift: FPS_MAX_FRAMES=12
    assert data.enable_thinking == "auto"  # answers without reasoning train non-thinking, with reasoning thinking
    assert training.weight_decay == 0 and training.max_grad_norm == 1
    assert training.router_aux_loss_coef == (0.001 if moe else None)


@pytest.mark.parametrize("script", RECIPES)
def test_qwen3_5_recipes_parse_with_the_published_settings(script, tmp_path):
    default_model, sharding, zero_config, moe = RECIPES[script]
    cmd = dry_run(script, DATASETS="demo_shapes", OUTPUT_DIR=str(tmp_path / "out"))
    assert _value(cmd, "--model_name_or_path") == default_model
    if sharding == "fsdp2":
        assert "--deepspeed" not in cmd and Path(_value(cmd, "--fsdp_config")) == REPO / "scripts" / "fsdp2.json"
    else:
        expected = "zero2.json" if sharding == "zero2" else zero_config
        assert Path(_value(cmd, "--deepspeed")) == REPO / "scripts" / expected and "--fsdp" not in cmd
    model, data, training, _ = parse_args(_train_args(cmd))
    _recipe_settings(model, data, training, moe)
    # 2 samples per GPU and step: ms-swift's global batch of 16 on 8 GPUs, one token-budget micro-batch.
    assert training.token_budget_samples == 2 and training.gradient_accumulation_steps == 1
    assert training.compile_layers == (sharding != "zero3") and training.gradient_checkpointing == (sharding == "zero3")


@pytest.mark.parametrize("script", RECIPES)
def test_qwen3_5_recipes_take_model_official_batching_and_user_flags(script, tmp_path):
    _, _, zero_config, moe = RECIPES[script]
    local = tmp_path / "Qwen3.5"  # a local copy of the checkpoint
    local.mkdir()
    cmd = dry_run(script, "--learning_rate", "2e-6", "--enable_thinking", "false", MODEL=str(local),
                  DATASETS="demo_shapes", OUTPUT_DIR=str(tmp_path / "out"), FAST="0")
    assert _value(cmd, "--model_name_or_path") == str(local)  # MODEL= (or MODEL_PATH=)
    assert Path(_value(cmd, "--deepspeed")) == REPO / "scripts" / zero_config
    model, data, training, _ = parse_args(_train_args(cmd))
    assert training.learning_rate == 2e-6 and data.enable_thinking == "false"  # the user's values win
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps) == (1, 2)
    assert training.gradient_checkpointing and not training.compile_layers and training.token_budget_samples is None
    if moe:
        assert training.router_aux_loss_coef == 0.001


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               WANDB_MODE="offline", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PRECISION", "MODEL_PATH"):
        env.pop(key, None)
    env.update(extra)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("script", RECIPES)
def test_qwen3_5_recipes_start_training_on_a_tiny_model(script, tiny_model_dir, tmp_path):
    """The script itself, through launch.sh and torchrun, on a tiny Qwen3.5 (MoE for the 35B-A3B) on the CPU:
    its flags (recipe, thinking mode, router loss) train two steps. ZeRO-3 single-process stands in for the
    GPU shardings (FSDP2 needs GPUs; compiling every layer takes minutes on a CPU)."""
    from tests.conftest import copy_demo_annotations

    model_type = "qwen3_5_moe" if RECIPES[script][3] else "qwen3_5"
    dictionary = copy_demo_annotations(tmp_path / "data")
    out = tmp_path / "out"
    env = _env(MODEL=str(tiny_model_dir(model_type)), DATASETS="demo_shapes%2,demo_text%4", OUTPUT_DIR=str(out),
               NPROC_PER_NODE="1", SHARDING="zero3", ZERO_CONFIG="zero3.json")
    result = run_command(["bash", f"scripts/{script}", "--dataset_dictionary", str(dictionary), "--max_steps", "2",
                             "--report_to", "none", "--dataloader_num_workers", "0", "--save_strategy", "no",
                             "--max_pixels", str(112 * 112), "--min_pixels", str(56 * 56),
                             "--model_max_length", "2048"],
                         env=env, timeout=1100)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert "loss: first" in result.stdout
    assert ("router_aux_loss" in result.stdout + result.stderr) == RECIPES[script][3]
    assert (out / "model.safetensors").is_file() or any(out.glob("model*.safetensors"))
