"""What happens around a run: eval datasets are evaluated without --eval_strategy, a finished run is left alone."""
from __future__ import annotations

import json

import pytest

from qwenvl.train.arguments import parse_args


@pytest.fixture
def base(tiny_model_dir, tmp_path):
    return ["--model_name_or_path", str(tiny_model_dir("qwen2_5_vl")), "--tune_mm_llm", "True",
            "--output_dir", str(tmp_path / "out"), "--eval_dataset_use", "demo_shapes_eval%10"]


def test_eval_datasets_without_a_schedule_are_evaluated_at_the_save_steps(base, capsys):
    training = parse_args(base + ["--save_steps", "7"]).training
    assert (training.eval_strategy.value, training.eval_steps) == ("steps", 7)
    assert "note: --eval_dataset_use demo_shapes_eval%10 without --eval_strategy: evaluating every 7 steps" \
        in capsys.readouterr().err
    # the official scripts pass --eval_strategy "no" explicitly: eval datasets still get evaluated
    assert parse_args(base + ["--eval_strategy", "no", "--save_steps", "7"]).training.eval_steps == 7
    # without step saves: once per epoch
    assert parse_args(base + ["--save_strategy", "no"]).training.eval_strategy.value == "epoch"
    assert parse_args(base + ["--save_strategy", "epoch"]).training.eval_strategy.value == "epoch"
    capsys.readouterr()
    # a schedule the user chose stands, silently
    training = parse_args(base + ["--eval_strategy", "steps", "--eval_steps", "3"]).training
    assert (training.eval_strategy.value, training.eval_steps) == ("steps", 3)
    assert "note:" not in capsys.readouterr().err
    # no eval datasets: nothing changes
    assert parse_args(base[:-2]).training.eval_strategy.value == "no"


@pytest.mark.slow
def test_eval_without_schedule_then_rerunning_a_finished_command_changes_nothing(tiny_model_dir, tmp_path, capsys):
    from qwenvl.train.train_qwen import train

    from .test_train_qwen import _flags

    out = tmp_path / "out"
    flags = _flags(tiny_model_dir("qwen2_5_vl"), out, "--tune_mm_llm", "True", "--max_steps", "2",
                   "--save_steps", "2", "--eval_dataset_use", "demo_shapes_eval%5")
    train(flags)
    state = json.loads((out / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "eval_loss" in e] == [2]  # evaluated at the save step
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()

    train(flags)  # the same command again
    printed = capsys.readouterr().out
    assert f"the run in {out} is already complete (step 2 of 2" in printed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # no checkpoint-3, nothing rewritten
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]

    # a changed command (longer) resumes as before
    train([*flags, "--max_steps", "3"])
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3


@pytest.mark.slow
def test_a_finished_runs_advice_names_only_a_checkpoint_a_resume_would_use(tiny_model_dir, tmp_path, capsys):
    """The "already complete" advice named any checkpoint-* folder as the one to resume from, even one whose
    weights were cut short since (a copy to another disk interrupted): the resume itself would pass over it."""
    from qwenvl.train.train_qwen import train

    from .test_train_qwen import _flags

    out = tmp_path / "out"
    flags = _flags(tiny_model_dir("qwen2_5_vl"), out, "--tune_mm_llm", "True", "--max_steps", "2", "--save_steps", "1")
    train(flags)
    weights = out / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()

    train(flags)
    printed = capsys.readouterr().out
    assert "To train longer, raise --max_steps or --num_train_epochs (it resumes from checkpoint-1);" in printed
    assert f"checkpoint-2 is not resumable (damaged: model.safetensors is {weights.stat().st_size:,} bytes" in printed

    for name in ("model.safetensors", "checkpoint_complete.json"):  # checkpoint-1 damaged too, differently
        (out / "checkpoint-1" / name).unlink()
    train(flags)
    printed = capsys.readouterr().out
    assert (f"To train longer, pass --model_name_or_path {out} with a new --output_dir (no complete checkpoint-* "
            "to resume from)") in printed
    assert "checkpoint-1 is not resumable (no checkpoint_complete.json" in printed
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]  # nothing rewritten
