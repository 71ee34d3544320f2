"""A resumed run whose length changed trains every step on its own schedule, never at the checkpoint's
stale last rate (an extended linear run trained its first new step at 0.0)."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from transformers import get_scheduler

from qwenvl.train.resume_schedule import align_resumed_schedule, describe_realignment
from qwenvl.train.train_qwen import train

from .test_robust_training import _flags


def _optimizer_and_scheduler(kind: str, warmup: int, total: int):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    # Two groups with their own base rates, as --mm_projector_lr gives.
    optimizer = torch.optim.AdamW([{"params": [model.weight], "lr": 1e-3}, {"params": [model.bias], "lr": 2e-4}])
    return model, optimizer, get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def _train(model, optimizer, scheduler, steps: int) -> list[tuple[float, float]]:
    """The Trainer's order: the step trains at the groups' current rates, then the scheduler moves them on.
    Returns each step's (first group's, second group's) rate."""
    rates = []
    for _ in range(steps):
        rates.append(tuple(group["lr"] for group in optimizer.param_groups))
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return rates


def _warmup(ratio: float, total: int) -> int:
    return math.ceil(ratio * total)  # TrainingArguments.get_warmup_steps


@pytest.mark.parametrize("kind, ratio, planned, stop, total", [
    ("linear", 0.0, 4, 4, 6),          # a finished run extended: it ended at 0.0
    ("cosine", 0.25, 4, 4, 8),         # warmup 1 step of 4, then 2 of 8
    ("cosine", 0.5, 8, 2, 12),         # stopped inside a warmup that now lasts longer
    ("linear", 0.0, 8, 4, 6),          # shortened
    ("constant_with_warmup", 0.5, 4, 2, 8),
    ("constant", 0.0, 4, 4, 6),
])
def test_a_resumed_run_trains_each_step_at_the_rate_of_a_run_planned_with_its_flags(tmp_path, kind, ratio, planned,
                                                                                     stop, total):
    model, optimizer, scheduler = _optimizer_and_scheduler(kind, _warmup(ratio, planned), planned)
    _train(model, optimizer, scheduler, stop)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp_path / "scheduler.pt")
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": stop, "max_steps": planned}))
    stale = [group["lr"] for group in optimizer.param_groups]

    # The resumed run: this run's optimizer and schedule, then the checkpoint's states (as the Trainer does).
    model, optimizer, scheduler = _optimizer_and_scheduler(kind, _warmup(ratio, total), total)
    optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(tmp_path / "scheduler.pt", weights_only=True))
    change = align_resumed_schedule(scheduler, stop, total, str(tmp_path))
    resumed = _train(model, optimizer, scheduler, total - stop)

    fresh = _train(*_optimizer_and_scheduler(kind, _warmup(ratio, total), total), total)[stop:]
    assert [r for step in resumed for r in step] == pytest.approx([r for step in fresh for r in step], rel=1e-12,
                                                                   abs=1e-15), (resumed, fresh, stale)
    assert change.planned_steps == planned and change.restored_lr == stale[0] and change.lr == fresh[0][0]
    assert change.changed == (planned != total or stale[0] != fresh[0][0])


def test_a_plain_resume_changes_nothing_and_says_nothing(tmp_path):
    model, optimizer, scheduler = _optimizer_and_scheduler("cosine", 2, 10)
    _train(model, optimizer, scheduler, 4)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 4, "max_steps": 10}))
    before = [group["lr"] for group in optimizer.param_groups]
    change = align_resumed_schedule(scheduler, 4, 10, str(tmp_path))
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx(before, rel=1e-12)
    assert not change.changed


def test_the_realignment_is_described_with_both_lengths_and_rates(tmp_path):
    model, optimizer, scheduler = _optimizer_and_scheduler("linear", 0, 4)
    _train(model, optimizer, scheduler, 4)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 4, "max_steps": 4}))
    model, optimizer, fresh = _optimizer_and_scheduler("linear", 0, 6)
    optimizer.load_state_dict(scheduler.optimizer.state_dict())
    fresh.load_state_dict(scheduler.state_dict())
    text = describe_realignment(align_resumed_schedule(fresh, 4, 6, str(tmp_path)), "linear", 0)
    assert text.startswith("resuming step 4 of a run planned for 4 steps, now 6: the linear schedule is recomputed "
                           "over 6 steps; step 5 trains at lr 0.000333333 (the checkpoint's optimizer held 0)"), text


def test_only_checkpoints_with_a_schedule_state_are_realigned(tmp_path):
    """A --save_only_model checkpoint restarts the schedule (checkpoints.py warns so): nothing to realign there."""
    from qwenvl.train.resume_schedule import holds_schedule_state

    plain, engine, model_only = (tmp_path / name for name in ("plain", "deepspeed", "model_only"))
    for folder in (plain, engine, model_only):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"")
        (folder / "trainer_state.json").write_text("{}")
    (plain / "scheduler.pt").write_bytes(b"")
    (engine / "global_step4").mkdir()  # DeepSpeed's engine state, scheduler included
    assert holds_schedule_state(str(plain)) and holds_schedule_state(str(engine))
    assert not holds_schedule_state(str(model_only))


@pytest.mark.slow
def test_an_extended_finished_run_trains_its_new_steps_on_the_new_schedule(tiny_model_dir, tmp_path, capsys):
    """A finished 4-step linear run re-run with --max_steps 6 resumed from checkpoint-4 and trained step 5 at
    learning rate 0.0 (the old schedule's end, restored into the optimizer), then jumped to the new schedule."""
    model = tiny_model_dir("qwen2_5_vl")
    common = ["--lr_scheduler_type", "linear", "--save_steps", "2"]
    extended, fresh = tmp_path / "extended", tmp_path / "fresh"
    train(_flags(model, extended, *common, "--max_steps", "4"))
    capsys.readouterr()
    train(_flags(model, extended, *common, "--max_steps", "6"))
    printed = capsys.readouterr().out
    train(_flags(model, fresh, *common, "--max_steps", "6"))

    def logged(folder):
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        return {entry["step"]: entry for entry in history if "loss" in entry}

    resumed, planned = logged(extended), logged(fresh)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        rates = {key: value for key, value in resumed[step].items() if key.startswith(("learning_rate", "lr/"))}
        assert rates and rates == pytest.approx(
            {key: planned[step][key] for key in rates}, rel=1e-9), (step, rates, planned[step])
    assert resumed[5]["learning_rate"] == pytest.approx(1e-3 * 2 / 6, rel=1e-9)  # not 0.0
    assert printed.count("resuming step 4 of a run planned for 4 steps, now 6: the linear schedule is recomputed "
                         "over 6 steps; step 5 trains at lr 0.000333333 (the checkpoint's optimizer held 0)") == 1


def test_a_schedule_driven_by_the_losses_keeps_its_restored_rates(tmp_path):
    """reduce_lr_on_plateau's rate follows the losses seen, not the step: resuming restores it as it was."""
    _, optimizer, scheduler = _optimizer_and_scheduler("reduce_lr_on_plateau", 0, 4)
    for group in optimizer.param_groups:
        group["lr"] *= 0.1  # as a plateau would have lowered it
    before = [group["lr"] for group in optimizer.param_groups]
    assert align_resumed_schedule(scheduler, 4, 6, str(tmp_path)) is None
    assert [group["lr"] for group in optimizer.param_groups] == before


@pytest.mark.slow
def test_under_deepspeed_an_extended_run_trains_its_new_steps_on_the_new_schedule(tiny_model_dir, tmp_path):
    """DeepSpeed restores the optimizer and the scheduler itself (engine.load_checkpoint, no scheduler.pt): the
    same stale rate reached the first resumed step there (ZeRO-2, one CPU process)."""
    from tests.commands import run_command

    from .conftest import free_port
    from .test_robust_training import _env, _train_command

    model = tiny_model_dir("qwen2_5_vl")
    common = ["--lr_scheduler_type", "linear", "--save_steps", "2", "--deepspeed", "scripts/zero2.json"]
    extended, fresh = tmp_path / "extended", tmp_path / "fresh"

    def run(out, steps):
        env = _env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        result = run_command(_train_command() + _flags(model, out, *common, "--max_steps", str(steps)), env=env,
                             timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    run(extended, 4)
    printed = run(extended, 6)
    run(fresh, 6)

    def rates(folder):
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        return {entry["step"]: {k: v for k, v in entry.items() if k.startswith(("learning_rate", "lr/"))}
                for entry in history if "loss" in entry}

    resumed, planned = rates(extended), rates(fresh)
    assert resumed[5] and resumed[5] == pytest.approx(planned[5], rel=1e-9) and resumed[6] == pytest.approx(
        planned[6], rel=1e-9), (resumed, planned)
    assert resumed[5]["learning_rate"] > 0
    assert "resuming step 4 of a run planned for 4 steps, now 6" in printed


@pytest.mark.slow
def test_under_fsdp2_an_extended_run_trains_its_new_steps_on_the_new_schedule(untied_model_dir, tmp_path):
    """FSDP2 restores the optimizer through accelerate's load_fsdp_optimizer: a 2-step linear run extended to 4
    trains step 3 at half the base rate and step 4 at a quarter, as a 4-step run does (two CPU processes,
    tests/train/fsdp_cpu.py)."""
    from tests.conftest import copy_demo_annotations

    from .test_fsdp2 import FSDP, _torchrun
    from .test_fsdp2 import _flags as _fsdp_flags
    from .test_train_qwen import _env, _run

    dictionary = copy_demo_annotations(tmp_path / "data")
    out = tmp_path / "fsdp"
    harness = ["-m", "tests.train.fsdp_cpu", "--use_cpu", "True", *FSDP]
    for steps in (2, 4):
        result = _run(_torchrun(*harness, *_fsdp_flags(untied_model_dir, out, dictionary, "--max_steps", str(steps),
                                                       "--lr_scheduler_type", "linear")), _env())
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    rates = {entry["step"]: entry["learning_rate"] for entry in history if "loss" in entry}
    # steps 1-2 on the 2-step schedule (1, 1/2), steps 3-4 on the 4-step one (2/4, 1/4); step 3 trained at 0.0
    assert rates == pytest.approx({1: 1e-3, 2: 1e-3 / 2, 3: 1e-3 * 2 / 4, 4: 1e-3 / 4}, rel=1e-9, abs=1e-15), rates
    assert result.stdout.count("resuming step 2 of a run planned for 2 steps, now 4: the linear schedule is "
                               "recomputed") == 1  # from the main process only


def _deepspeed_warmup_decay(total: int):
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optimizer, WarmupDecayLR(optimizer, total_num_steps=total, warmup_min_lr=0.0, warmup_max_lr=1e-3,
                                           warmup_num_steps=2, warmup_type="linear")


def test_a_deepspeed_config_schedule_is_recomputed_at_its_saved_position(tmp_path):
    """A "scheduler" section of the DeepSpeed config (WarmupDecayLR) restores only its last_batch_iteration, and the
    optimizer the 4-step schedule's last rate: an 8-step resume trained step 5 at 5e-4, a planned run at 8.33e-4."""
    model, optimizer, scheduler = _deepspeed_warmup_decay(4)
    _train(model, optimizer, scheduler, 4)
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()
    resumed_model, optimizer, resumed = _deepspeed_warmup_decay(8)
    optimizer.load_state_dict(saved_optimizer)
    resumed.load_state_dict(saved_scheduler)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)  # the stale rate step 5 would train at

    (tmp_path / "trainer_state.json").write_text(json.dumps({"max_steps": 4, "global_step": 4}))
    change = align_resumed_schedule(resumed, 4, 8, str(tmp_path))
    planned_rates = _train(*_deepspeed_warmup_decay(8), 8)
    assert [rate for rate, in _train(resumed_model, optimizer, resumed, 4)] == pytest.approx(
        [rate for rate, in planned_rates[4:]], rel=1e-12)
    assert planned_rates[4][0] == pytest.approx(1e-3 * 5 / 6)
    assert (change.planned_steps, change.total_steps, change.restored_lr) == (4, 8, pytest.approx(5e-4))
    assert describe_realignment(change, "linear", 0) == (
        "resuming step 4 of a run planned for 4 steps, now 8: the DeepSpeed config's WarmupDecayLR schedule (its "
        "\"scheduler\" section) is recomputed at its saved position with this run's parameters; step 5 trains at lr "
        "0.000833333 (the checkpoint's optimizer held 0.0005), as a run planned with this config would.")


@pytest.mark.slow
def test_under_deepspeed_a_config_schedule_trains_the_first_resumed_step_at_its_planned_rate(tiny_model_dir,
                                                                                             tmp_path):
    """WarmupDecayLR from the DeepSpeed config (ZeRO-2, one CPU process): a 4-step run extended to 8 trained step 5
    at 5e-4, the 4-step schedule's rate restored with the optimizer; a run planned for 8 steps trains it at
    1e-3 x 5/6 (measured: 8.333e-4, then 6.667e-4, 5e-4, 3.333e-4, as here). The Trainer's logged rate never
    showed it (it reads the rate after the step's scheduler step), so tests.train.rate_probe prints them. The
    merger (--mm_projector_lr 1e-2) follows the same schedule at its own rate, before and after the resume: the
    config's "auto" warmup_max_lr became one rate per group, and the recomputed schedule keeps them."""
    from tests.commands import run_command

    from .conftest import free_port
    from .rate_probe import group_rates
    from .test_robust_training import REPO, _env

    config = json.loads((REPO / "scripts" / "zero2.json").read_text())
    config["scheduler"] = {"type": "WarmupDecayLR", "params": {
        "warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto", "total_num_steps": "auto",
        "warmup_type": "linear"}}
    (tmp_path / "zero2_decay.json").write_text(json.dumps(config))
    model, out = tiny_model_dir("qwen2_5_vl"), tmp_path / "out"
    common = ["--save_steps", "2", "--warmup_steps", "2", "--mm_projector_lr", "1e-2",
              "--deepspeed", str(tmp_path / "zero2_decay.json")]

    def run(steps):
        env = _env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        result = run_command([sys.executable, "-m", "tests.train.rate_probe",
                              *_flags(model, out, *common, "--max_steps", str(steps))], env=env, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        rates = dict(line.split()[1:] for line in result.stdout.splitlines() if line.startswith("RATE "))
        by_step = group_rates(result.stdout)
        assert set(by_step) == {int(step) for step in rates}
        for step, groups in by_step.items():  # the merger at its own rate, 10x the llm's
            assert groups["merger"] == pytest.approx(10 * groups["llm"], rel=1e-12, abs=0), (step, groups)
        return {int(step): float(rate) for step, rate in rates.items()}, result.stdout

    first, _ = run(4)
    assert first == pytest.approx({1: 0.0, 2: 0.0, 3: 5e-4, 4: 1e-3}, rel=1e-9)  # DeepSpeed's linear warmup, 2 steps
    resumed, printed = run(8)
    assert resumed == pytest.approx({5: 1e-3 * 5 / 6, 6: 1e-3 * 4 / 6, 7: 1e-3 * 3 / 6, 8: 1e-3 * 2 / 6}, rel=1e-9)
    assert printed.count("resuming step 4 of a run planned for 4 steps, now 8: the DeepSpeed config's WarmupDecayLR "
                         "schedule") == 1

    # A config that spells the old length out: transformers refuses it, which was a ValueError traceback.
    config["scheduler"]["params"]["total_num_steps"] = 8
    (tmp_path / "zero2_decay.json").write_text(json.dumps(config))
    env = _env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    result = run_command([sys.executable, "-m", "tests.train.rate_probe",
                          *_flags(model, out, *common, "--max_steps", "10")], env=env, timeout=900)
    assert result.returncode == 2, result.stderr[-3000:]
    assert (f"error: the DeepSpeed config {tmp_path / 'zero2_decay.json'} disagrees with this run's flags:\n  "
            "ds scheduler.params.total_num_steps=8 vs hf num_training_steps (calculated)=10\nSet those keys to "
            '"auto" in it') in result.stderr
    assert "Traceback" not in result.stderr and "RATE" not in result.stdout
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6",
                                                                  "checkpoint-8"]
