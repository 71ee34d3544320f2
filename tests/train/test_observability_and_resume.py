"""wandb (offline) and tensorboard logs, evaluation during training, and resume after SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.commands import run_command


def _flags(path, out, *extra):
    return ["--model_name_or_path", str(path), "--dataset_use", "demo_shapes%10,demo_text%20",
            "--output_dir", str(out), "--tune_mm_llm", "True", "--tune_mm_mlp", "True",
            "--data_flatten", "True", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--max_pixels", str(112 * 112), "--min_pixels", str(56 * 56), "--logging_steps", "1",
            "--dataloader_num_workers", "0", "--seed", "5", *extra]


@pytest.mark.slow
def test_wandb_offline_tensorboard_and_eval_loss(tiny_model_dir, tmp_path, monkeypatch):
    from qwenvl.train.train_qwen import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "qwenvl-tests")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    out = tmp_path / "out"
    train(_flags(tiny_model_dir("qwen2_5_vl"), out, "--max_steps", "4", "--report_to", "wandb,tensorboard",
                 "--run_name", "observed", "--eval_dataset_use", "demo_shapes_eval%10", "--eval_strategy", "steps",
                 "--eval_steps", "2", "--save_strategy", "no"))

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    train_logs = [e for e in history if "loss" in e]
    assert len(train_logs) == 4
    assert all({"lr/llm", "lr/merger", "grad_norm", "tokens_per_second", "visual_tokens_per_second"} <= e.keys()
               for e in train_logs)
    assert [e["step"] for e in history if "eval_loss" in e] == [2, 4]

    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert (runs[0] / "files").is_dir()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events
    scalars = set()
    for event in events:
        acc = EventAccumulator(str(event))
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr/llm", "eval/loss"} <= scalars


@pytest.mark.slow
def test_resume_after_sigkill_ends_like_an_uninterrupted_run(tiny_model_dir, tmp_path):
    path = tiny_model_dir("qwen2_5_vl")
    common = ["--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2", "--report_to", "none",
              "--save_total_limit", "5"]
    command = [sys.executable, "-m", "qwenvl.train.train_qwen"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    straight = tmp_path / "straight"
    run_command(command + _flags(path, straight, *common), check=True, env=env, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command + _flags(path, killed, *common), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (killed / "checkpoint-4" / "trainer_state.json").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "trainer_state.json").exists()  # it really died mid-run

    # The same command again resumes from the newest checkpoint and finishes the run.
    rerun = run_command(command + _flags(path, killed, *common), env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout

    def final(folder):
        state = json.loads((folder / "trainer_state.json").read_text())
        losses = {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}
        return state["global_step"], losses

    steps_a, losses_a = final(straight)
    steps_b, losses_b = final(killed)
    assert steps_a == steps_b == 6
    for step in (5, 6):  # the steps trained after the resume
        assert losses_b[step] == pytest.approx(losses_a[step], rel=1e-3)
