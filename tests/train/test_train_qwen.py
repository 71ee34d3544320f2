"""train_qwen.py end to end on the demo data: in process, as a torchrun script, under DeepSpeed."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from qwenvl.train.model import component_of
from qwenvl.train.train_qwen import _clean_message, train
from tests.commands import run_command
from tests.conftest import load_processor

from .conftest import free_port

REPO = Path(__file__).resolve().parents[2]
PIXELS = ["--max_pixels", str(112 * 112), "--min_pixels", str(56 * 56)]


def _flags(model_dir, out, *extra):
    return ["--model_name_or_path", str(model_dir), "--dataset_use", "demo_shapes%4,demo_text%5",
            "--output_dir", str(out), "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--report_to", "none", "--use_cpu", "True", "--model_max_length", "512",
            "--dataloader_num_workers", "0", "--disable_tqdm", "True", *PIXELS, *extra]


def _changed(base_dir, trained_dir) -> set[str]:
    """The components whose saved weights differ from the base checkpoint's."""
    base = dict(AutoModelForImageTextToText.from_pretrained(base_dir).named_parameters())
    trained = AutoModelForImageTextToText.from_pretrained(trained_dir)
    return {component_of(name) for name, p in trained.named_parameters() if not torch.equal(p, base[name])}


def test_argument_problems_exit_2_without_traceback(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train(["--model_name_or_path", str(tiny_model_dir("qwen2_5_vl")), "--output_dir", str(tmp_path),
               "--bf16", "True", "--fp16", "True"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "\nerror: " in "\n" + err and "nothing to train" in err and "--bf16 and --fp16" in err
    assert "Traceback" not in err


def test_data_problems_exit_1_without_traceback(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train(_flags(tiny_model_dir("qwen2_5_vl"), tmp_path / "out", "--tune_mm_llm", "True",
                     "--dataset_use", "no_such_dataset"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "\ndata error: " in "\n" + err and "no_such_dataset" in err and "Traceback" not in err


def test_unsupported_family_exits_2(tmp_path, capsys):
    from transformers import AutoConfig

    AutoConfig.for_model("llava").save_pretrained(tmp_path / "llava")
    with pytest.raises(SystemExit) as exit_info:
        train(_flags(tmp_path / "llava", tmp_path / "out", "--tune_mm_llm", "True"))
    assert exit_info.value.code == 2 and "not supported" in capsys.readouterr().err


def test_worker_tracebacks_are_stripped_from_data_errors():
    wrapped = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               "  File \"x.py\", line 1, in f\n    raise DataError(msg)\n"
               "qwenvl.data.errors.DataError: dataset 'a', record 3: image b.png not found\nfix the path")
    assert _clean_message(ValueError(wrapped)) == "dataset 'a', record 3: image b.png not found\nfix the path"
    assert _clean_message(ValueError("plain")) == "plain"


@pytest.mark.slow
def test_train_save_summary_and_resume(tiny_model_dir, tmp_path, capsys):
    model_dir = tiny_model_dir("qwen2_5_vl")
    out = tmp_path / "out"
    flags = _flags(model_dir, out, "--tune_mm_mlp", "True", "--tune_mm_llm", "True", "--mm_projector_lr", "5e-3",
                   "--data_flatten", "True", "--save_steps", "2", "--lr_scheduler_type", "constant")
    assert train(flags + ["--max_steps", "2"]) == str(out)
    printed = capsys.readouterr().out
    assert "merger" in printed and "loss: first" in printed and "loss_curve.png" in printed
    for name in ("model.safetensors", "config.json", "chat_template.jinja", "loss_curve.png", "run_args.json",
                 "checkpoint-2/model.safetensors", "checkpoint-2/processor_config.json"):
        assert (out / name).is_file(), name
    run_args = json.loads((out / "run_args.json").read_text())
    assert run_args["tune_mm_mlp"] is True and run_args["max_steps"] == 2
    assert _changed(model_dir, out) == {"merger", "llm"}
    assert load_processor(out).image_processor.size["longest_edge"] == 112 * 112

    # The same output_dir resumes from checkpoint-2 (as the official code) and goes on to step 3.
    train(flags + ["--max_steps", "3"])
    printed = capsys.readouterr().out
    assert f"resuming from {out / 'checkpoint-2'}" in printed
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]
    # Resuming restored the weights: 2 + 1 steps end exactly where 3 uninterrupted steps do.
    straight = tmp_path / "straight"
    train(flags + ["--output_dir", str(straight), "--max_steps", "3"])  # the last --output_dir wins
    resumed = dict(AutoModelForImageTextToText.from_pretrained(out).named_parameters())
    for name, param in AutoModelForImageTextToText.from_pretrained(straight).named_parameters():
        assert torch.equal(param, resumed[name]), name

    # A run file with the saved flags reproduces the (latest) run's arguments.
    from qwenvl.train.arguments import parse_args

    assert parse_args([str(out / "run_args.json")]).training.max_steps == 3


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               WANDB_MODE="offline")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def _run(cmd, env, timeout=900):
    return run_command(cmd, env=env, timeout=timeout, check=True)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2.json", "zero3.json"])
def test_deepspeed_single_process(tiny_model_dir, tmp_path, config):
    """ZeRO-2 / ZeRO-3 in one CPU process; frozen weights come back bit-identical from the gathered save."""
    model_dir = tiny_model_dir("qwen3_vl")
    out = tmp_path / "out"
    env = _env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = [sys.executable, "-m", "qwenvl.train.train_qwen",
           *_flags(model_dir, out, "--tune_mm_mlp", "True", "--tune_mm_vision", "True", "--vision_tower_lr", "2e-3",
                   "--max_steps", "2", "--save_steps", "2", "--deepspeed", f"scripts/{config}")]
    result = _run(cmd, env)
    assert "lr/vision" in result.stdout and "loss: first" in result.stdout
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-2" / "chat_template.jinja").is_file()
    changed = _changed(model_dir, out)
    assert changed == {"merger", "vision"}, changed  # the language model stayed frozen
    load_processor(out / "checkpoint-2")


@pytest.mark.slow
def test_launch_script_runs_torchrun_on_the_script_path(tiny_model_dir, tmp_path):
    """scripts/launch.sh -> torchrun qwenvl/train/train_qwen.py (the file, not the module), CPU, LoRA."""
    model_dir = tiny_model_dir("qwen2_5_vl")
    out = tmp_path / "lora"
    env = _env(MODEL_PATH=str(model_dir), DATASETS="demo_shapes%4", OUTPUT_DIR=str(out), NPROC_PER_NODE="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    flags = [f for f in _flags(model_dir, out)[6:]]  # everything but model, data and output
    result = _run(["bash", "scripts/launch.sh", *flags, "--tune_mm_llm", "True", "--tune_mm_mlp", "True",
                   "--lora_enable", "True", "--lora_r", "4", "--max_steps", "2"], env)
    assert "LoRA adapter and processor saved" in result.stdout
    assert (out / "adapter_model.safetensors").is_file() and (out / "chat_template.jinja").is_file()
    merged = out.parent / "merged"
    _run([sys.executable, "-m", "qwenvl.tools.merge_lora", "--checkpoint", str(out), "--output", str(merged)], env)
    model = AutoModelForImageTextToText.from_pretrained(merged)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"


@pytest.mark.slow
def test_lora_resume_restores_adapters_and_full_modules(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    model_dir = tiny_model_dir("qwen3_vl")
    out, straight = tmp_path / "out", tmp_path / "straight"
    flags = _flags(model_dir, out, "--tune_mm_llm", "True", "--tune_mm_mlp", "True", "--lora_enable", "True",
                   "--lora_r", "4", "--learning_rate", "5e-3", "--save_steps", "2", "--lr_scheduler_type", "constant")
    train(flags + ["--max_steps", "2"])
    train(flags + ["--max_steps", "3"])
    train(flags + ["--output_dir", str(straight), "--max_steps", "3"])
    resumed = load_file(out / "adapter_model.safetensors")
    expected = load_file(straight / "adapter_model.safetensors")
    assert resumed.keys() == expected.keys() and any("merger" in k for k in resumed)
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key


def test_allocator_grows_segments_unless_the_user_configured_it():
    from qwenvl.train.train_qwen import default_allocator_settings

    env = {}
    default_allocator_settings(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        env = {name: "max_split_size_mb:512"}
        default_allocator_settings(env)
        assert env == {name: "max_split_size_mb:512"}
