"""The official qwen-vl-finetune command lines run here: README example, argument.py, scripts/sft*.sh."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwenvl.train.arguments import parse_args
from qwenvl.train.official_flags import expand_pixel_products

from .conftest import free_port
from .test_train_qwen import _env, _run

REPO = Path(__file__).resolve().parents[2]


def _official_readme_flags(model_dir, out, cache_dir) -> list[str]:
    """The training flags of the official qwen-vl-finetune README's example command, as a shell passes
    them (``576\\*28\\*28`` arrives as ``576*28*28``), in the README's order."""
    return [
        "--model_name_or_path", str(model_dir), "--tune_mm_llm", "True", "--tune_mm_vision", "False",
        "--tune_mm_mlp", "False", "--dataset_use", "demo_shapes%4,demo_text%5", "--output_dir", str(out),
        "--cache_dir", str(cache_dir),
        "--bf16", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4",
        "--learning_rate", "2e-7", "--mm_projector_lr", "1e-5", "--vision_tower_lr", "1e-6", "--optim", "adamw_torch",
        "--model_max_length", "4096", "--data_flatten", "True", "--data_packing", "True",
        "--max_pixels", "576*28*28", "--min_pixels", "16*28*28",
        "--video_fps", "2", "--video_max_frames", "8", "--video_min_frames", "4",
        "--video_max_pixels", "1664*28*28", "--video_min_pixels", "256*28*28",
        "--num_train_epochs", "3", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--weight_decay", "0.01",
        "--logging_steps", "10", "--save_steps", "500", "--save_total_limit", "3",
        "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.0",
        "--deepspeed", str(REPO / "scripts/zero3.json"),
    ]


def test_frozen_component_learning_rate_is_one_warning_not_an_error(tiny_model_dir, tmp_path, capsys):
    model, _, training, explicit = parse_args(
        ["--model_name_or_path", str(tiny_model_dir("qwen2_5_vl")), "--output_dir", str(tmp_path),
         "--tune_mm_llm", "True", "--tune_mm_vision", "False", "--mm_projector_lr", "1e-5",
         "--vision_tower_lr", "1e-6"])
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if line.startswith("warning:")]
    assert len(warnings) == 2, err  # one line per flag
    assert "--vision_tower_lr 1e-06 has no effect: the vision tower is frozen" in warnings[0]
    assert "--mm_projector_lr 1e-05 has no effect: the merger is frozen" in warnings[1]
    # dropped, so no optimizer group is asked for a component without trainable parameters
    assert training.vision_tower_lr is None and training.mm_projector_lr is None
    assert not model.tune_mm_vision and "vision_tower_lr" not in explicit
    # a trained component keeps its rate, silently
    _, _, training, _ = parse_args(["--model_name_or_path", str(tiny_model_dir("qwen2_5_vl")), "--output_dir",
                                    str(tmp_path), "--tune_mm_vision", "True", "--vision_tower_lr", "1e-6"])
    assert training.vision_tower_lr == 1e-6 and "warning" not in capsys.readouterr().err


def test_pixel_products_and_base_interval_as_the_official_code_reads_them(tiny_model_dir, tmp_path, capsys):
    assert expand_pixel_products(["--max_pixels", "576*28*28", "--min_pixels=16*28*28", "--learning_rate", "2*3"]) \
        == ["--max_pixels", "451584", "--min_pixels=12544", "--learning_rate", "2*3"]
    _, data, _, _ = parse_args(["--model_name_or_path", str(tiny_model_dir("qwen2_5_vl")), "--output_dir",
                                str(tmp_path), "--tune_mm_llm", "True", "--max_pixels", "576*28*28",
                                "--video_max_pixels", "1664*28*28", "--base_interval", "2"])
    assert data.max_pixels == 576 * 28 * 28 and data.video_max_pixels == 1664 * 28 * 28
    assert "--base_interval 2 has no effect" in capsys.readouterr().err
    run = tmp_path / "run.yaml"
    run.write_text(f"model_name_or_path: {tiny_model_dir('qwen2_5_vl')}\ntune_mm_llm: true\n"
                   f"output_dir: {tmp_path}\nmin_pixels: 16*28*28\nbase_interval: 4\n")
    assert parse_args([str(run)]).data.min_pixels == 16 * 28 * 28


def test_every_official_flag_is_accepted_with_its_official_meaning(tiny_model_dir, tmp_path):
    """Every field of the official argument.py and every flag of the official scripts/sft*.sh."""
    model, data, training, _ = parse_args(
        _official_readme_flags(tiny_model_dir("qwen2_5_vl"), tmp_path / "out", tmp_path / "cache")
        + ["--use_cpu", "True", "--base_interval", "2",
           # official scripts/sft*.sh flags not in the README example
           "--per_device_eval_batch_size", "8", "--eval_strategy", "no", "--save_strategy", "steps",
           "--max_grad_norm", "1", "--gradient_checkpointing", "True", "--dataloader_num_workers", "4",
           "--run_name", "qwen2vl-baseline", "--report_to", "none"])
    assert (model.tune_mm_llm, model.tune_mm_mlp, model.tune_mm_vision) == (True, False, False)
    assert (data.data_flatten, data.data_packing, data.dataset_use) == (True, True, "demo_shapes%4,demo_text%5")
    assert (data.max_pixels, data.min_pixels) == (576 * 28 * 28, 16 * 28 * 28)
    assert (data.video_max_pixels, data.video_min_pixels) == (1664 * 28 * 28, 256 * 28 * 28)
    assert (data.video_fps, data.video_max_frames, data.video_min_frames) == (2, 8, 4)
    assert training.cache_dir == str(tmp_path / "cache") and training.optim == "adamw_torch"
    assert training.bf16 and training.model_max_length == 4096 and training.learning_rate == 2e-7
    assert (training.lora_enable, training.lora_r, training.lora_alpha, training.lora_dropout) == (True, 8, 16, 0.0)
    assert training.warmup_steps == 0.03 and training.lr_scheduler_type == "cosine"
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps) == (4, 4)
    assert (training.save_steps, training.save_total_limit, training.logging_steps) == (500, 3, 10)
    assert training.gradient_checkpointing and training.max_grad_norm == 1 and training.run_name == "qwen2vl-baseline"
    assert training.deepspeed == str(REPO / "scripts/zero3.json")


@pytest.mark.slow
def test_official_readme_example_command_trains(tiny_model_dir, tmp_path):
    """The README's example, verbatim (DeepSpeed ZeRO-3, LoRA, bf16, flatten + packing), on a tiny model in one
    CPU process. Added for a CPU test only (after the README's flags, so they win): --use_cpu, two steps of
    2 samples without accumulation, no reporting, no dataloader workers."""
    model_dir = tiny_model_dir("qwen2_5_vl")
    out = tmp_path / "out"
    env = _env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    result = _run([sys.executable, "-m", "qwenvl.train.train_qwen",
                   *_official_readme_flags(model_dir, out, tmp_path / "cache"),
                   "--use_cpu", "True", "--max_steps", "2", "--per_device_train_batch_size", "2",
                   "--gradient_accumulation_steps", "1", "--report_to", "none", "--dataloader_num_workers", "0",
                   "--disable_tqdm", "True"], env)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and all("has no effect" in w for w in warnings), result.stderr
    assert "LoRA adapter and processor saved" in result.stdout
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    adapters = load_file(out / "adapter_model.safetensors")
    assert adapters and all("visual" not in key for key in adapters)  # merger and vision tower: frozen, not saved
    assert all(torch.isfinite(v).all() for v in adapters.values())
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapters.items())  # LoRA trained (B starts at 0)
