"""Nothing lost, nothing hangs: complete-marked checkpoints, Ctrl-C, foreign output folders,
the skip policy at batch size 1 under two processes, empty mixtures, secrets in wandb's files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qwenvl.train.checkpoints import (COMPLETE_MARKER, DiskFullError, check_free_space, mark_complete,
                                      newest_complete_checkpoint, remove_stale_checkpoints, resume_point)
from qwenvl.train.train_qwen import train
from tests.commands import run_command

from .conftest import free_port

REPO = Path(__file__).resolve().parents[2]
PIXELS = ["--max_pixels", str(56 * 56), "--min_pixels", str(28 * 28)]


def _flags(model_dir, out, *extra, data="demo_shapes%2,demo_text%4"):
    return ["--model_name_or_path", str(model_dir), "--dataset_use", data, "--output_dir", str(out),
            "--tune_mm_llm", "True", "--tune_mm_mlp", "True", "--per_device_train_batch_size", "1",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--report_to", "none", "--use_cpu", "True",
            "--model_max_length", "512", "--dataloader_num_workers", "0", "--disable_tqdm", "True", "--seed", "3",
            *PIXELS, *extra]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               WANDB_MODE="offline", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "QWENVL_TEST_KILL_DURING_SAVE"):
        env.pop(key, None)
    env.update(extra)
    return env


def _train_command():
    return [sys.executable, "-m", "qwenvl.train.train_qwen"]


def _state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


# ---- which checkpoints count ----

def _fake_checkpoint(root: Path, step: int, complete: bool) -> Path:
    from safetensors.torch import save_file

    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(4)}, str(folder / "model.safetensors"))  # a whole (tiny) weights file
    if complete:
        for name in ("optimizer.pt", "scheduler.pt"):  # what a Trainer checkpoint holds besides the model
            (folder / name).write_bytes(b"state")
        (folder / "trainer_state.json").write_text("{}")
        mark_complete(str(folder), step)
    return folder


def test_the_newest_complete_checkpoint_is_chosen_and_newer_cut_off_ones_are_named(tmp_path):
    _fake_checkpoint(tmp_path, 2, complete=True)
    four = _fake_checkpoint(tmp_path, 4, complete=True)
    six = _fake_checkpoint(tmp_path, 6, complete=False)
    chosen, ignored = newest_complete_checkpoint(str(tmp_path))
    assert chosen == str(four)
    assert [i.path for i in ignored] == [str(six)] and "trainer_state.json missing" in ignored[0].why
    checkpoint, notes = resume_point(None, str(tmp_path))
    assert checkpoint == str(four) and len(notes) == 1 and str(six) in notes[0]
    marker = json.loads((four / COMPLETE_MARKER).read_text())
    assert marker["step"] == 4 and "model.safetensors" in marker["files"]


def test_checkpoints_written_before_markers_existed_still_resume(tmp_path):
    two = _fake_checkpoint(tmp_path, 2, complete=False)
    (two / "trainer_state.json").write_text("{}")  # whole, by an older version: no marker
    cut_off = _fake_checkpoint(tmp_path, 4, complete=False)
    chosen, ignored = newest_complete_checkpoint(str(tmp_path))
    assert chosen == str(two) and [i.path for i in ignored] == [str(cut_off)]
    _fake_checkpoint(tmp_path, 6, complete=True)  # once markers exist, only they count
    assert newest_complete_checkpoint(str(tmp_path))[0] == str(tmp_path / "checkpoint-6")
    (tmp_path / "checkpoint-6" / COMPLETE_MARKER).unlink()
    (tmp_path / "checkpoint-6" / "x").write_text("")
    _fake_checkpoint(tmp_path, 3, complete=True)
    assert newest_complete_checkpoint(str(tmp_path))[0] == str(tmp_path / "checkpoint-3")


def test_a_damaged_checkpoint_is_passed_over_or_refused_before_the_model_loads(tmp_path):
    """A file the marker lists deleted (the Trainer skipped a missing optimizer.pt without a word), a weights file
    cut short, an empty trainer_state.json (a deep traceback each before), a folder that does not exist."""
    from qwenvl.train.arguments import ConfigError

    two = _fake_checkpoint(tmp_path, 2, complete=True)
    four = _fake_checkpoint(tmp_path, 4, complete=True)
    assert json.loads((four / COMPLETE_MARKER).read_text())["sizes"]["optimizer.pt"] == 5
    assert resume_point(None, str(tmp_path)) == (str(four), [])
    assert resume_point("True", str(tmp_path))[0] == str(four)  # the Trainer's resume_from_checkpoint=True

    (four / "optimizer.pt").unlink()
    checkpoint, notes = resume_point(None, str(tmp_path))
    assert checkpoint == str(two)
    assert notes == [f"ignoring {four}: damaged: optimizer.pt missing (listed in its {COMPLETE_MARKER}); it is "
                     "replaced when that step is saved again"]
    with pytest.raises(ConfigError) as err:
        resume_point(str(four), str(tmp_path))
    assert str(err.value) == (f"--resume_from_checkpoint {four} cannot be resumed from: optimizer.pt missing (listed "
                              f"in its {COMPLETE_MARKER}). Resume from another checkpoint (checkpoint-2 next to it), "
                              "or leave the flag out; to start from its weights with a new optimizer, pass the "
                              "folder as --model_name_or_path instead.")

    weights = two / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 4)
    with pytest.raises(ConfigError, match=r"model.safetensors is \d+ bytes, \d+ when saved \(cut short"):
        resume_point(str(two), str(tmp_path))
    (two / COMPLETE_MARKER).unlink()  # no marker to compare with: the header still shows the cut
    with pytest.raises(ConfigError, match="model.safetensors is cut short"):
        resume_point(str(two), str(tmp_path))
    (two / "trainer_state.json").write_text("")
    with pytest.raises(ConfigError, match="its trainer_state.json cannot be read"):
        resume_point(str(two), str(tmp_path))
    with pytest.raises(ConfigError, match="no_such_checkpoint: no such folder"):
        resume_point(str(tmp_path / "no_such_checkpoint"), str(tmp_path))
    with pytest.raises(ConfigError, match="False: a run resumes from the newest complete checkpoint of --output_dir "
                                          "on its own .* to start again instead, choose a new --output_dir"):
        resume_point("False", str(tmp_path))
    # a run's folder (final model and trainer_state.json, no optimizer): the Trainer resumed it with a new optimizer
    (tmp_path / "run_args.json").write_text("{}")
    (tmp_path / "trainer_state.json").write_text('{"global_step": 4}')
    with pytest.raises(ConfigError) as err:
        resume_point(str(tmp_path), str(tmp_path))
    assert f"--resume_from_checkpoint {tmp_path} is a run's output folder, not a checkpoint (it has no optimizer " \
           "state). Resume from one of its checkpoints (checkpoint-2, checkpoint-4)" in str(err.value)


def test_resuming_a_checkpoint_without_optimizer_state_says_what_restarts(tmp_path):
    """--save_only_model checkpoints resumed with a new optimizer and the schedule from its first step (the
    learning rate jumped back up), without a word."""
    two = _fake_checkpoint(tmp_path, 2, complete=True)
    for name in ("scheduler.pt", "optimizer.pt"):
        (two / name).unlink()
    mark_complete(str(two), 2)
    checkpoint, notes = resume_point(None, str(tmp_path))
    assert checkpoint == str(two) and len(notes) == 1
    assert f"warning: {two} holds no optimizer or scheduler state (saved with --save_only_model)" in notes[0]
    assert "learning-rate schedule (warmup included) starts again from its first step" in notes[0]
    assert len(resume_point(str(two), str(tmp_path))[1]) == 1
    for name in ("scheduler.pt", "optimizer.pt"):
        (two / name).write_bytes(b"x")
    mark_complete(str(two), 2)
    assert resume_point(None, str(tmp_path)) == (str(two), [])


def test_a_lora_checkpoint_resumed_without_lora_is_refused_before_the_model_loads(tmp_path):
    """The rank, alpha and targets of a LoRA checkpoint are compared in tests/train/test_lora_resume.py."""
    from qwenvl.train.arguments import ConfigError
    from qwenvl.train.checkpoints import check_checkpoint_fits

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "base_model_name_or_path": "/models/base"}))
    check_checkpoint_fits(str(tmp_path), None, True, "/models/base")
    with pytest.raises(ConfigError, match="is a LoRA checkpoint .* but this run trains without --lora_enable"):
        check_checkpoint_fits(str(tmp_path), None, False, "/models/base")


def test_rotation_keeps_the_newest_complete_checkpoints_and_a_save_in_progress(tmp_path):
    old_broken = _fake_checkpoint(tmp_path, 1, complete=False)
    for step in (2, 3, 4):
        _fake_checkpoint(tmp_path, step, complete=True)
    in_progress = _fake_checkpoint(tmp_path, 5, complete=False)
    deleted = remove_stale_checkpoints(str(tmp_path), keep=1)
    assert sorted(deleted) == sorted(str(tmp_path / f"checkpoint-{s}") for s in (1, 2, 3))
    assert (tmp_path / "checkpoint-4").is_dir() and in_progress.is_dir() and not old_broken.exists()


def test_a_full_disk_names_the_disk_and_the_bytes_needed(tmp_path):
    with pytest.raises(DiskFullError) as err:
        check_free_space(str(tmp_path / "out" / "checkpoint-8"), needed=5_000_000, free=1_000)
    message = str(err.value)
    assert "5,000,000 bytes" in message and "1,000 bytes" in message and "mounted at /" in message
    check_free_space(str(tmp_path / "checkpoint-8"), needed=1)  # room enough: no error


@pytest.mark.slow
def test_killed_mid_save_resumes_from_the_previous_complete_checkpoint(tiny_model_dir, tmp_path):
    """SIGKILL right after checkpoint-4's weights are written (before its optimizer and trainer state):
    the same command resumes from checkpoint-2, says why checkpoint-4 was passed over, and ends
    where an uninterrupted run ends."""
    path = tiny_model_dir("qwen2_5_vl")
    common = ["--max_steps", "5", "--save_strategy", "steps", "--save_steps", "2", "--lr_scheduler_type",
              "constant"]
    out = tmp_path / "out"
    killed = run_command(_train_command() + _flags(path, out, *common), env=_env(QWENVL_TEST_KILL_DURING_SAVE="4"),
                         timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (out / "checkpoint-4" / "model.safetensors").is_file()  # half-written: weights only
    assert not (out / "checkpoint-4" / "trainer_state.json").exists()
    assert (out / "checkpoint-2" / COMPLETE_MARKER).is_file()

    rerun = run_command(_train_command() + _flags(path, out, *common), env=_env(), timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-2'}" in rerun.stdout
    assert f"ignoring {out / 'checkpoint-4'}" in rerun.stderr
    state = _state(out)
    assert state["global_step"] == 5
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4, 5]
    assert (out / "checkpoint-4" / COMPLETE_MARKER).is_file()  # written again, whole this time

    straight = tmp_path / "straight"
    run_command(_train_command() + _flags(path, straight, *common, "--save_strategy", "no"), env=_env(),
                check=True, timeout=900)
    expected = {e["step"]: e["loss"] for e in _state(straight)["log_history"] if "loss" in e}
    resumed = {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}
    for step in (3, 4, 5):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-4), step


# ---- Ctrl-C ----

def _run_until_logged(command, env, steps_logged: int = 1):
    """Start a run and return it once it has printed ``steps_logged`` loss logs."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen = 0
    deadline = time.time() + 600
    for line in proc.stdout:
        seen += "'loss'" in line
        if seen >= steps_logged:
            return proc
        assert time.time() < deadline
    raise AssertionError(f"the run ended before logging a step: {proc.wait()} {proc.stderr.read()[-3000:]}")


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_without_a_traceback(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    command = _train_command() + _flags(tiny_model_dir("qwen2_5_vl"), out, "--max_steps", "500",
                                        "--save_strategy", "steps", "--save_steps", "1000")
    proc = _run_until_logged(command, _env())
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / COMPLETE_MARKER).is_file()
    step = int(checkpoints[0].name.split("-")[1])
    assert f"stopped by SIGINT after step {step}: checkpoint saved in {checkpoints[0]}" in stderr
    assert not (out / "model.safetensors").exists()  # no final model for an unfinished run
    assert _state(checkpoints[0])["global_step"] == step


# ---- the output folder ----

def test_a_foreign_output_folder_is_refused_and_left_untouched(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "someone_else"
    out.mkdir()
    (out / "config.json").write_text('{"theirs": true}')
    with pytest.raises(SystemExit) as exit_info:
        train(_flags(tiny_model_dir("qwen2_5_vl"), out, "--max_steps", "1"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "not empty (config.json)" in err and "--overwrite_output_dir" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert (out / "config.json").read_text() == '{"theirs": true}'


def test_nothing_is_written_when_the_data_checks_fail(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train(_flags(tiny_model_dir("qwen2_5_vl"), out, "--max_steps", "1", data="demo_shapes%0"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "the dataset mixture is empty" in err and "dataset 'demo_shapes': its rate is 0" in err
    assert "num_samples" not in err and "Traceback" not in err
    assert not (out / "run_args.json").exists()


def test_an_empty_annotation_file_is_named(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    dictionary = tmp_path / "dict.json"
    dictionary.write_text(json.dumps({"nothing": {"annotation_path": "empty.jsonl", "data_path": "."}}))
    with pytest.raises(SystemExit) as exit_info:
        train(_flags(tiny_model_dir("qwen2_5_vl"), tmp_path / "out", "--dataset_dictionary", str(dictionary),
                     data="nothing"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "dataset 'nothing'" in err and "empty.jsonl" in err and "Traceback" not in err


@pytest.mark.slow
def test_resuming_says_which_flags_changed(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    model_dir = tiny_model_dir("qwen2_5_vl")
    train(_flags(model_dir, out, "--max_steps", "1", "--save_steps", "1"))
    capsys.readouterr()
    train(_flags(model_dir, out, "--max_steps", "2", "--save_steps", "1", data="demo_shapes%3,demo_text%4"))
    err = capsys.readouterr().err
    trained, _, other = err.partition("other changed flags:")
    assert "change what is trained" in trained
    assert '--dataset_use: "demo_shapes%2,demo_text%4" -> "demo_shapes%3,demo_text%4"' in trained
    assert "--max_steps: 1 -> 2" in other and "--max_steps" not in trained
    assert json.loads((out / "run_args.previous.json").read_text())["dataset_use"] == "demo_shapes%2,demo_text%4"
    assert json.loads((out / "run_args.json").read_text())["dataset_use"] == "demo_shapes%3,demo_text%4"


# ---- the skip policy at batch size 1, two processes ----

def _dictionary_with_a_bad_record(folder: Path) -> Path:
    records = [json.loads(line) for line in (REPO / "demo_data" / "text.jsonl").read_text().splitlines()[:5]]
    records.insert(2, {"id": "bad", "image": "images/missing.png",
                       "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                         {"from": "gpt", "value": "nothing"}]})
    (folder / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    dictionary = folder / "dict.json"
    dictionary.write_text(json.dumps({"mixed": {"annotation_path": "mixed.jsonl",
                                                "data_path": str(REPO / "demo_data")}}))
    return dictionary


@pytest.mark.slow
def test_skip_at_batch_size_one_never_ends_a_two_process_run(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    dictionary = _dictionary_with_a_bad_record(tmp_path)
    flags = _flags(tiny_model_dir("qwen2_5_vl"), out, "--dataset_dictionary", str(dictionary),
                   "--bad_sample_policy", "skip", "--num_train_epochs", "1", "--ddp_backend", "gloo",
                   "--save_strategy", "no", data="mixed")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "qwenvl.train.train_qwen", *flags]
    result = run_command(command, env=_env(), timeout=900)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-5000:]}"
    state = _state(out)
    assert state["global_step"] == 3  # 6 items, 2 ranks, one each per step: the bad one was stood in for
    lines = [json.loads(line) for f in sorted(out.glob("skipped_samples.rank*.jsonl"))
             for line in f.read_text().splitlines()]
    assert len(lines) == 1 and "missing.png" in lines[0]["reason"]
    assert not (out / "skipped_samples.jsonl").exists()  # never one file shared by both ranks
    assert [e["skipped_samples"] for e in state["log_history"] if "loss" in e][-1] == 1  # over both ranks


# ---- secrets on the command line ----

@pytest.mark.slow
def test_a_hub_token_on_the_command_line_is_not_written_into_the_wandb_run(tiny_model_dir, tmp_path):
    secret = "hf_notarealtoken1234567890"
    out = tmp_path / "out"
    command = _train_command() + _flags(tiny_model_dir("qwen2_5_vl"), out, "--max_steps", "1", "--report_to",
                                        "wandb", "--hub_token", secret, "--save_strategy", "no")
    result = run_command(command, env=_env(WANDB_DIR=str(tmp_path), WANDB_PROJECT="qwenvl-tests"), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_file = next(runs[0].glob("run-*.wandb"))  # wandb 0.31 keeps the metadata in it
    # wandb's service process may still be writing the run file when the training process has exited
    deadline = time.monotonic() + 120
    while b"--hub_token" not in run_file.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    recorded = run_file.read_bytes()
    assert b"--hub_token" in recorded and b"<redacted>" in recorded  # the command line is recorded, not its secret
    for written in [p for p in tmp_path.rglob("*") if p.is_file()]:
        assert secret.encode() not in written.read_bytes(), written


# ---- resume memory ----

def test_resume_reads_the_checkpoint_in_the_training_dtype():
    from qwenvl.train.trainer import checkpoint_load_dtype

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)).to(torch.bfloat16)
    assert checkpoint_load_dtype(model) == torch.bfloat16
    model[1].float()  # mixed dtypes: float32 holds each exactly
    assert checkpoint_load_dtype(model) == torch.float32


# ---- the length cache under several processes ----

@pytest.mark.slow
def test_two_processes_without_a_length_cache_stop_with_the_audit_command_that_builds_it(tiny_model_dir, tmp_path):
    import shlex

    from tests.conftest import copy_demo_annotations

    dictionary = copy_demo_annotations(tmp_path / "data")  # fresh annotation copies: no cache next to them
    out = tmp_path / "out"
    flags = _flags(tiny_model_dir("qwen2_5_vl"), out, "--dataset_dictionary", str(dictionary),
                   "--group_by_modality_length", "True", "--max_steps", "1", "--ddp_backend", "gloo",
                   "--save_strategy", "no", data="demo_shapes%3,demo_text%5")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "qwenvl.train.train_qwen", *flags]
    env = _env(XDG_CACHE_HOME=str(tmp_path / "cache"))  # nor in the user cache folder
    # 180 records: above a limit of 100, so the run stops; the default limit counts them inline
    stopped = run_command(command, env={**env, "QWENVL_INLINE_LENGTH_COUNT": "100"}, timeout=900)
    assert stopped.returncode != 0
    assert "no length cache for demo_shapes, demo_text (" in stopped.stderr
    audit = [line.strip() for line in stopped.stderr.splitlines() if "qwenvl.tools.audit" in line][0]
    assert "--dataset_use demo_shapes%3,demo_text%5" in audit and "--max_pixels 3136" in audit
    assert not (out / "run_args.json").exists()

    argv = shlex.split(audit)
    small = [f if f != str(out) else str(tmp_path / "inline") for f in command]
    inline = run_command(small[:6] + [str(free_port())] + small[7:], env=env, timeout=900)
    assert inline.returncode == 0, inline.stderr[-3000:]  # under the default limit: counted on rank 0
    assert _state(tmp_path / "inline")["global_step"] == 1
    for cache in (tmp_path / "data").rglob("*.lengths.*"):
        cache.unlink()  # the audit builds them again below

    built = run_command([sys.executable, *argv[1:], "--num_workers", "1", "--report", str(tmp_path / "r.json")],
                        env=env, timeout=900)
    assert built.returncode == 0, built.stderr[-3000:]
    again = run_command(command[:6] + [str(free_port())] + command[7:], env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _state(out)["global_step"] == 1


@pytest.mark.slow
def test_ctrl_c_under_torchrun_saves_one_checkpoint_from_both_ranks(tiny_model_dir, tmp_path):
    """The terminal's SIGINT reaches torchrun and both ranks, and torchrun forwards it once more:
    the ranks agree on one step, save it and exit without a traceback of ours."""
    out = tmp_path / "out"
    flags = _flags(tiny_model_dir("qwen2_5_vl"), out, "--max_steps", "500", "--save_strategy", "steps",
                   "--save_steps", "1000", "--ddp_backend", "gloo")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "qwenvl.train.train_qwen", *flags]
    proc = _run_until_logged(command, _env(TORCH_ELASTIC_SHUTDOWN_TIMEOUT="300"))
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=600)
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / COMPLETE_MARKER).is_file(), stderr[-4000:]
    step = int(checkpoints[0].name.split("-")[1])
    assert f"after step {step}: checkpoint saved in {checkpoints[0]}" in stderr
    assert "KeyboardInterrupt" not in stderr
    assert _state(checkpoints[0])["global_step"] == step


@pytest.mark.slow
def test_two_process_resume_restores_the_weights_on_every_rank(tiny_model_dir, tmp_path):
    """Rank 0 alone reads the checkpoint (DDP copies its weights to rank 1): 2 + 1 steps end where 3 do."""
    from transformers import AutoModelForImageTextToText

    def run(out, steps):
        flags = _flags(tiny_model_dir("qwen2_5_vl"), out, "--max_steps", str(steps), "--save_steps", "2",
                       "--lr_scheduler_type", "constant", "--ddp_backend", "gloo")
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), "-m", "qwenvl.train.train_qwen", *flags]
        result = run_command(command, env=_env(), timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        return result

    out, straight = tmp_path / "out", tmp_path / "straight"
    run(out, 2)
    assert f"resuming from {out / 'checkpoint-2'}" in run(out, 3).stdout
    run(straight, 3)
    losses = [{e["step"]: e["loss"] for e in _state(folder)["log_history"] if "loss" in e}
              for folder in (out, straight)]
    assert losses[0][3] == pytest.approx(losses[1][3], rel=1e-5)
    resumed = dict(AutoModelForImageTextToText.from_pretrained(out).named_parameters())
    for name, param in AutoModelForImageTextToText.from_pretrained(straight).named_parameters():
        assert torch.allclose(param, resumed[name], rtol=0, atol=1e-6), name


def test_inline_length_count_limit_reads_the_environment():
    from qwenvl.train.length_cache import INLINE_COUNT_LIMIT, inline_count_limit

    assert inline_count_limit({}) == INLINE_COUNT_LIMIT
    assert inline_count_limit({"QWENVL_INLINE_LENGTH_COUNT": "0"}) == 0


# ---- the model folder ----

def _model_folder(tmp_path, source, keep, extra=None):
    """A copy of ``source`` holding only the files ``keep`` names (and ``extra``: name -> text)."""
    import shutil

    folder = tmp_path / "model"
    folder.mkdir()
    for name in keep:
        shutil.copy(Path(source) / name, folder / name)
    for name, text in (extra or {}).items():
        (folder / name).write_text(text)
    return folder


PROCESSOR_FILES = ["tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"]


@pytest.mark.parametrize("keep, extra, message", [
    (["model.safetensors", *PROCESSOR_FILES], {"adapter_config.json": '{"base_model_name_or_path": "/models/base"}'},
     "is a LoRA adapter (adapter_config.json, no config.json), not a full model. Merge it into its base first: "
     "python -m qwenvl.tools.merge_lora --checkpoint {model}"),
    (["model.safetensors", *PROCESSOR_FILES], None, "{model} has no config.json: give the folder"),
    (["config.json", *PROCESSOR_FILES], None, "{model} has a config.json but no weights"),
    (["config.json", "model.safetensors"], None,
     "cannot load the processor of --model_name_or_path {model} (Can't load image processor"),
])
def test_an_unusable_model_folder_is_named_before_anything_is_written(tiny_model_dir, tmp_path, capsys, keep, extra,
                                                                      message):
    """A LoRA adapter, weights without config.json, a config without weights, weights without the processor files:
    each was a transformers traceback (the last two after the data was built and run_args.json written)."""
    model = _model_folder(tmp_path, tiny_model_dir("qwen2_5_vl"), keep, extra)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train(_flags(model, out, "--max_steps", "1"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message.format(model=model) in err and "Traceback" not in err, err
    assert not out.exists()


# ---- resuming a checkpoint this run cannot continue ----

@pytest.mark.slow
def test_a_finished_run_rerun_with_other_flags_is_left_alone_and_a_mismatched_checkpoint_is_refused(
        tiny_model_dir, tmp_path, capsys):
    """A finished run re-run with a changed flag resumed at max_steps and trained one step past it (checkpoint-3,
    the final model overwritten); another model's or a LoRA checkpoint failed deep in the loader, after
    run_args.json was replaced (which then hid that the original command had finished)."""
    out = tmp_path / "out"
    flags = _flags(tiny_model_dir("qwen2_5_vl"), out, "--max_steps", "2", "--save_steps", "2")
    train(flags)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()

    train(flags + ["--logging_steps", "2"])
    printed = capsys.readouterr().out
    assert f"the run in {out} is already complete: its newest checkpoint {out / 'checkpoint-2'} (step 2) reaches " \
           "--max_steps 2" in printed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # no checkpoint-3, nothing rewritten

    for extra, message in [
        (["--model_name_or_path", str(tiny_model_dir("qwen3_vl")), "--max_steps", "3"],
         f"{out / 'checkpoint-2'} holds a different model than --model_name_or_path "
         f"{tiny_model_dir('qwen3_vl')} (model_type: qwen2_5_vl there, qwen3_vl here"),
        (["--lora_enable", "True", "--max_steps", "3"],
         f"{out / 'checkpoint-2'} is a full fine-tuning checkpoint, but this run trains LoRA adapters"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            train(flags + extra)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    # lowering --max_steps below a checkpoint with no final model of that step: refused, not step N+1
    (out / "trainer_state.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        train(flags + ["--max_steps", "1"])
    assert exit_info.value.code == 2
    assert (f"{out / 'checkpoint-2'} is at step 2, which is past --max_steps 1: resuming would train step 3 "
            "anyway") in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_resuming_with_new_learning_rates_says_they_are_not_applied():
    """torch's Optimizer.load_state_dict and the scheduler's state restore the saved learning rates, weight decay
    and betas over the flags: the changed values were listed as changing what is trained, yet never used."""
    from qwenvl.train.output_dir import describe_changes

    previous = {"learning_rate": 1e-3, "tune_mm_llm": True}
    current = {"learning_rate": 5e-4, "mm_projector_lr": 1e-4, "tune_mm_llm": True}
    text = describe_changes(previous, current, "out/checkpoint-4")
    assert "warning: --learning_rate, --mm_projector_lr not applied: resuming restores the optimizer and " \
           "learning-rate schedule of out/checkpoint-4 with the values it was saved with" in text
    assert "not applied" not in describe_changes(previous, current, None)  # a new run in the folder uses them


@pytest.mark.slow
def test_resuming_with_other_trainable_parts_names_the_flags_instead_of_a_torch_traceback(tiny_model_dir, tmp_path,
                                                                                          capsys):
    out = tmp_path / "out"
    flags = _flags(tiny_model_dir("qwen2_5_vl"), out, "--save_steps", "2")
    train(flags + ["--max_steps", "2"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train(flags + ["--max_steps", "3", "--tune_mm_vision", "True"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: cannot resume the optimizer state of {out / 'checkpoint-2'}: it was saved for other trainable " \
           "parameters" in err and "--tune_mm_vision" in err and "Traceback" not in err, err
    # the original command still finds its run complete, whatever the failed attempt wrote
    train(flags + ["--max_steps", "2"])
    assert "is already complete" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


@pytest.mark.slow
def test_a_run_killed_while_writing_its_final_model_is_not_taken_for_a_finished_one(tiny_model_dir, tmp_path):
    """trainer_state.json was written before the final model: a kill in between left a folder that every re-run
    called "already complete" while its model.safetensors was cut off or missing."""
    path = tiny_model_dir("qwen2_5_vl")
    out = tmp_path / "out"
    command = _train_command() + _flags(path, out, "--max_steps", "2", "--save_steps", "2")
    killed = run_command(command, env=_env(QWENVL_TEST_KILL_DURING_SAVE="final"), timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (out / "checkpoint-2" / COMPLETE_MARKER).is_file() and not (out / "trainer_state.json").exists()

    rerun = run_command(command, env=_env(), timeout=900)
    assert rerun.returncode == 2, rerun.stderr[-3000:]
    assert "already complete" not in rerun.stdout
    assert (f"{out / 'checkpoint-2'} is at step 2, which reaches --max_steps 2: resuming would train step 3 anyway"
            in rerun.stderr) and "the checkpoint itself loads as the model of that step" in rerun.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


@pytest.mark.slow
def test_a_finished_run_without_checkpoints_is_not_trained_again_from_the_base_model(tiny_model_dir, tmp_path,
                                                                                     capsys):
    """--save_strategy no (or checkpoints deleted): raising --max_steps, as the completed-run message advised, trained
    again from --model_name_or_path and overwrote the finished model."""
    out = tmp_path / "out"
    flags = _flags(tiny_model_dir("qwen2_5_vl"), out, "--save_strategy", "no")
    train(flags + ["--max_steps", "2"])
    train(flags + ["--max_steps", "2"])
    assert f"To train longer, pass --model_name_or_path {out} with a new --output_dir" in capsys.readouterr().out
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(SystemExit) as exit_info:
        train(flags + ["--max_steps", "3"])
    assert exit_info.value.code == 2
    assert (f"--output_dir {out} holds a finished run's model (step 2) but no checkpoint-* to resume from: this run "
            "would train again from --model_name_or_path and overwrite that model") in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    train(flags + ["--max_steps", "3", "--overwrite_output_dir", "True"])  # replacing it, as asked
    assert _state(out)["global_step"] == 3


def test_a_second_run_into_a_folder_a_running_training_holds_is_refused(tiny_model_dir, tmp_path, capsys):
    """Two launches of one command (a double submit, a retry while the first runs) both trained into the folder,
    each deleting the other's checkpoint in progress as "left by a killed run". The lock dies with its process."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_args.json").write_text("{}")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from qwenvl.train.run_lock import "
                               "lock_output_dir; lock_output_dir(sys.argv[1]); print('locked', flush=True); "
                               "time.sleep(600)", str(out)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
        with pytest.raises(SystemExit) as exit_info:
            train(_flags(tiny_model_dir("qwen2_5_vl"), out, "--max_steps", "1"))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"another training run (pid {holder.pid} on " in err and f"is training into --output_dir {out}" in err
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    from qwenvl.train.output_dir import check_output_dir

    assert check_output_dir(str(out), False) == {}  # the killed holder's lock is gone with it
