"""Per-component learning rates under a DeepSpeed config's "scheduler" section: DeepSpeed gives each of the
section's rates to every optimizer group, and transformers fills "auto" with the one --learning_rate, so the
merger and the vision tower trained at the language model's rates (measured: all groups 5e-4 then 1e-3 where
--mm_projector_lr 1e-2 asked for 5e-3 then 1e-2)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from qwenvl.train.arguments import ConfigError, TrainingArguments, parse_args
from qwenvl.train.deepspeed_schedule import spread_rates_over_groups
from qwenvl.train.train_qwen import train

REPO = Path(__file__).resolve().parents[2]
AUTO_DECAY = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                   "warmup_num_steps": "auto", "total_num_steps": "auto",
                                                   "warmup_type": "linear"}}


def _config(tmp_path, name="zero2_sched.json", **sections) -> str:
    config = json.loads((REPO / "scripts" / "zero2.json").read_text())
    config.update(sections)
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture
def base(tiny_model_dir, tmp_path):
    return ["--model_name_or_path", str(tiny_model_dir("qwen2_5_vl")), "--tune_mm_llm", "True", "--tune_mm_mlp",
            "True", "--output_dir", str(tmp_path / "out"), "--learning_rate", "1e-3"]


# ---- what is refused at start-up, and what is kept ----

@pytest.mark.parametrize("scheduler, words", [
    ({"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3}},
     ['its "scheduler" (WarmupDecayLR) sets warmup_max_lr 0.001: DeepSpeed gives such a number to every optimizer '
      "group, so --mm_projector_lr 0.01 would be ignored", 'Write "auto" for warmup_max_lr',
      "or drop --mm_projector_lr"]),
    ({"type": "WarmupLR", "params": {"warmup_min_lr": 1e-6, "warmup_max_lr": "auto"}},
     ['sets warmup_min_lr 1e-06', 'Write "auto" for warmup_min_lr', '(warmup_min_lr "auto" is 0)']),
    ({"type": "WarmupDecayLR", "params": {"total_num_steps": "auto"}},
     ["leaves out warmup_max_lr (DeepSpeed's default: 0.001)", 'Write "auto" for warmup_max_lr']),
    ({"type": "OneCycle", "params": {"cycle_min_lr": 1e-5, "cycle_max_lr": 1e-3}},
     ["sets cycle_min_lr 1e-05 and sets cycle_max_lr 0.001", "Give cycle_min_lr and cycle_max_lr as lists with one "
      "value per optimizer group"]),
    ({"type": "LRRangeTest", "params": {}}, ["leaves out lr_range_test_min_lr (DeepSpeed's default: 0.001)"]),
])
def test_a_rate_written_as_a_number_is_refused_with_per_group_rates(base, tmp_path, scheduler, words):
    config = _config(tmp_path, scheduler=scheduler)
    with pytest.raises(ConfigError) as err:
        parse_args(base + ["--mm_projector_lr", "1e-2", "--deepspeed", config])
    assert f"the DeepSpeed config {config}: " in str(err.value)
    for text in words:
        assert text in str(err.value)
    # The same section is fine where every group has one rate: DeepSpeed's meaning is then the run's.
    parse_args(base + ["--mm_projector_lr", "1e-3", "--deepspeed", config])
    parse_args(base + ["--deepspeed", config])


@pytest.mark.parametrize("scheduler", [
    AUTO_DECAY,
    {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": "auto"}},
    {"type": "WarmupLR", "params": {}},  # DeepSpeed's default: each group's own rate
    {"type": "WarmupCosineLR", "params": {"warmup_min_ratio": 0.1, "cos_min_ratio": 0.01}},  # ratios of each rate
    {"type": "OneCycle", "params": {"cycle_min_lr": [0, 0, 0, 0], "cycle_max_lr": [1e-3, 1e-3, 1e-2, 1e-2]}},
])
def test_auto_rates_ratios_and_lists_are_kept(base, tmp_path, scheduler):
    parse_args(base + ["--mm_projector_lr", "1e-2", "--deepspeed", _config(tmp_path, scheduler=scheduler)])


def test_an_optimizer_section_is_kept_with_per_group_rates(base, tmp_path):
    """DeepSpeed builds that optimizer over the trainer's groups (the run below), so nothing is refused."""
    config = _config(tmp_path, optimizer={"type": "AdamW", "params": {"lr": "auto"}})
    parse_args(base + ["--tune_mm_vision", "True", "--vision_tower_lr", "2e-4", "--deepspeed", config])


def test_the_refusal_exits_2_before_any_work(base, tmp_path, capsys):
    config = _config(tmp_path, scheduler={"type": "WarmupDecayLR", "params": {"warmup_max_lr": 1e-3}})
    with pytest.raises(SystemExit) as exit_info:
        train(base + ["--mm_projector_lr", "1e-2", "--deepspeed", config, "--dataset_use", "demo_shapes%2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: the DeepSpeed config {config}: " in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ---- the per-group lists DeepSpeed's schedule is built from ----

def _groups():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(2)) for _ in range(4)]
    rates = {"llm": 1e-3, "llm_no_decay": 1e-3, "merger": 1e-2, "merger_no_decay": 1e-2}
    return [{"name": name, "params": [weight], "lr": lr, "weight_decay": 0.0}
            for (name, lr), weight in zip(rates.items(), weights)]


def test_auto_rates_become_one_value_per_group_and_deepspeed_schedules_each_at_its_own_rate(tmp_path):
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", learning_rate=1e-3, mm_projector_lr=1e-2,
                             deepspeed={**json.loads((REPO / "scripts" / "zero2.json").read_text()),
                                        "scheduler": AUTO_DECAY})
    config = args.hf_deepspeed_config.config  # "auto" filled by transformers: warmup_max_lr is now 1e-3
    assert config["scheduler"]["params"]["warmup_max_lr"] == 1e-3
    config["scheduler"]["params"].update(total_num_steps=4, warmup_num_steps=2)  # what transformers fills later
    groups = _groups()
    spread = spread_rates_over_groups(config, groups, args, "zero2_sched.json")
    assert spread == {"warmup_max_lr": [1e-3, 1e-3, 1e-2, 1e-2]}
    assert config["scheduler"]["params"]["warmup_min_lr"] == 0  # 0 at every scale: left as it is

    optimizer = torch.optim.AdamW(groups)
    schedule = WarmupDecayLR(optimizer, **config["scheduler"]["params"])
    rates = []
    for _ in range(4):
        rates.append([group["lr"] for group in optimizer.param_groups])
        schedule.step()
    factors = [0, 0, 0.5, 1.0]  # DeepSpeed's linear warmup over 2 steps (the first step at warmup_min_lr)
    for used, factor in zip(rates, factors):
        assert used == pytest.approx([factor * 1e-3] * 2 + [factor * 1e-2] * 2, rel=1e-12, abs=0)
    # Again (transformers may build the optimizer twice): the lists stay as they are.
    assert spread_rates_over_groups(config, groups, args, "zero2_sched.json") == {}


def test_a_per_group_list_of_another_length_names_the_groups(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", learning_rate=1e-3, mm_projector_lr=1e-2)
    config = {"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": [0, 0], "cycle_max_lr": [1e-3, 1e-2]}}}
    with pytest.raises(ConfigError, match=r'its "scheduler" \(OneCycle\) cycle_min_lr has 2 values, but the optimizer '
                                          r"has 4 groups \(llm, llm_no_decay, merger, merger_no_decay\): give one"):
        spread_rates_over_groups(config, _groups(), args, "one_cycle.json")


# ---- a real DeepSpeed run ----

@pytest.mark.slow
def test_under_deepspeed_each_group_trains_on_the_config_schedule_at_its_own_rate(tiny_model_dir, tmp_path):
    """ZeRO-2, one CPU process, WarmupDecayLR with "auto" rates, --mm_projector_lr 10x and --vision_tower_lr 0.2x
    --learning_rate: the rates each step's optimizer used (read from its groups as the step begins) are the
    schedule's factor times each group's own rate, and the logged lr/<group> and learning_rate are those rates."""
    from tests.commands import run_command

    from .conftest import free_port
    from .rate_probe import group_rates
    from .test_robust_training import _env, _flags

    out = tmp_path / "out"
    flags = _flags(tiny_model_dir("qwen2_5_vl"), out, "--tune_mm_vision", "True", "--mm_projector_lr", "1e-2",
                   "--vision_tower_lr", "2e-4", "--max_steps", "4", "--warmup_steps", "2", "--save_strategy", "no",
                   "--deepspeed", _config(tmp_path, scheduler=AUTO_DECAY))
    env = _env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    result = run_command([sys.executable, "-m", "tests.train.rate_probe", *flags], env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    base = {"llm": 1e-3, "merger": 1e-2, "vision": 2e-4}
    factors = {1: 0.0, 2: 0.0, 3: 0.5, 4: 1.0}  # DeepSpeed's linear warmup over 2 steps, then the decay
    used = group_rates(result.stdout)
    assert set(used) == set(factors)
    for step, factor in factors.items():
        expected = {name: factor * base[name.removesuffix("_no_decay")] for name in used[step]}
        assert set(expected) == {"llm", "llm_no_decay", "merger", "merger_no_decay", "vision", "vision_no_decay"}
        assert used[step] == pytest.approx(expected, rel=1e-12, abs=0), step
    assert used[4]["merger"] == pytest.approx(1e-2) and used[4]["vision"] == pytest.approx(2e-4)

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = {entry["step"]: {k: v for k, v in entry.items() if k.startswith(("learning_rate", "lr/"))}
              for entry in history if "loss" in entry}
    assert set(logged) == set(factors)
    for step, factor in factors.items():
        expected = {"learning_rate": factor * 1e-3, **{f"lr/{name}": factor * rate for name, rate in base.items()}}
        assert logged[step] == pytest.approx(expected, rel=1e-12, abs=0), step
    assert ('DeepSpeed "scheduler" WarmupDecayLR: each optimizer group follows the schedule at its own rate '
            "(warmup_max_lr llm 0.001, merger 0.01, vision 0.0002)") in result.stdout


@pytest.mark.slow
def test_a_deepspeed_optimizer_section_trains_the_groups_with_their_own_rates_and_decay(tiny_model_dir, tmp_path):
    """ZeRO-2, one CPU process, a config with an "optimizer" section (AdamW, "auto" rate and decay, betas and
    eps written out) and a WarmupDecayLR "scheduler": DeepSpeed's optimizer is built over the trainer's groups,
    so each trains at its own rate and biases and norms are not decayed.  Before, transformers handed DeepSpeed
    every trainable parameter as one group: one rate, and --weight_decay on biases and norms too."""
    from tests.commands import run_command

    from .conftest import free_port
    from .rate_probe import group_rates
    from .test_robust_training import _env, _flags

    section = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto", "eps": "auto",
                                           "torch_adam": True}}
    flags = _flags(tiny_model_dir("qwen2_5_vl"), tmp_path / "out", "--tune_mm_vision", "True",
                   "--mm_projector_lr", "1e-2", "--vision_tower_lr", "2e-4", "--weight_decay", "0.1",
                   "--adam_beta2", "0.95", "--max_steps", "3", "--warmup_steps", "1", "--save_strategy", "no",
                   "--optim", "adamw_torch_fused",  # as the recipes pass it: unused here, and said so
                   "--deepspeed", _config(tmp_path, optimizer=section, scheduler=AUTO_DECAY))
    env = _env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    result = run_command([sys.executable, "-m", "tests.train.rate_probe", *flags], env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    # The section's optimizer (DeepSpeed's choice for AdamW with torch_adam), with the flags' betas.
    line = next(line for line in result.stdout.splitlines() if line.startswith("OPTIMIZER "))
    kind, defaults = line.split(" ", 2)[1:]
    assert kind == "torch.optim.adamw.AdamW" and json.loads(defaults)["betas"] == [0.9, 0.95]

    names = {"llm", "llm_no_decay", "merger", "merger_no_decay", "vision", "vision_no_decay"}
    base = {"llm": 1e-3, "merger": 1e-2, "vision": 2e-4}
    used = group_rates(result.stdout)
    assert set(used) == {1, 2, 3}
    assert set(used[3]) == names
    assert used[3] == pytest.approx({name: 0.5 * base[name.removesuffix("_no_decay")] for name in names},
                                    rel=1e-12, abs=0)  # past the warmup step, half-way down the decay
    decay = group_rates(result.stdout, "GROUP_DECAY")
    assert decay[1] == {name: 0.0 if name.endswith("_no_decay") else 0.1 for name in names}
    assert "optimizer groups:" in result.stdout
    assert ('--optim adamw_torch_fused is not used: the DeepSpeed config\'s "optimizer" section (AdamW) chooses the '
            "optimizer") in result.stdout + result.stderr
