"""A DeepSpeed config's "optimizer" section beyond ZeRO-2's first steps (test_deepspeed_schedule.py has those):
ZeRO-3, optimizer offload (DeepSpeed's CPU Adam), a resume from its checkpoint with and without a "scheduler"
section, and Adagrad, which ZeRO collapses into one group."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from qwenvl.train.arguments import ConfigError, parse_args

REPO = Path(__file__).resolve().parents[2]
GROUPS = ("llm", "llm_no_decay", "merger", "merger_no_decay", "vision", "vision_no_decay")
BASE = {"llm": 1e-3, "merger": 1e-2, "vision": 2e-4}  # --learning_rate, --mm_projector_lr, --vision_tower_lr
AUTO_DECAY = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                   "warmup_num_steps": "auto", "total_num_steps": "auto",
                                                   "warmup_type": "linear"}}


def _config(tmp_path, script: str, **sections) -> str:
    config = json.loads((REPO / "scripts" / script).read_text())
    config.update(sections)
    path = tmp_path / f"with_sections_{script}"
    path.write_text(json.dumps(config))
    return str(path)


def _cosine(step: int, warmup: int, total: int) -> float:
    """transformers' cosine schedule factor for the step that trains after ``step`` scheduler steps."""
    if step < warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


CASES = {
    # DeepSpeed's own schedule; the section asks for torch's AdamW (DeepSpeed's FusedAdam needs a GPU).
    "zero3, scheduler section": dict(
        script="zero3.json", optimizer={"type": "AdamW", "params": {
            "lr": "auto", "weight_decay": "auto", "betas": "auto", "eps": "auto", "torch_adam": True}},
        scheduler=AUTO_DECAY, flags=["--warmup_steps", "2"], kind="torch.optim.adamw.AdamW",
        # DeepSpeed's linear warmup over 2 steps (the first step at warmup_min_lr), then the decay over 6
        factors={1: 0.0, 2: 0.0, 3: 0.5, 4: 1.0, 5: 0.75, 6: 0.5}),
    # The shipped offload config: DeepSpeed builds its CPU Adam over the groups; without a "scheduler" section,
    # transformers' --lr_scheduler_type schedule runs on DeepSpeed's optimizer.
    "zero3_offload_optimizer, transformers' schedule": dict(
        script="zero3_offload_optimizer.json", optimizer={"type": "AdamW", "params": {
            "lr": "auto", "weight_decay": "auto", "betas": "auto", "eps": "auto"}},
        scheduler=None, flags=["--lr_scheduler_type", "cosine", "--warmup_steps", "1"],
        kind="deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam",
        factors={step: _cosine(step - 1, 1, 6) for step in range(1, 7)}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_zero3_with_an_optimizer_section_trains_and_resumes_each_group_on_its_schedule(tiny_model_dir, tmp_path,
                                                                                       case):
    """ZeRO-3, one CPU process, --mm_projector_lr 10x and --vision_tower_lr 0.2x --learning_rate, --weight_decay 0.1:
    six steps saving at step 3, then a run resumed from checkpoint-3 (--resume_from_checkpoint, another
    --output_dir).  Each of the six groups trains at the schedule's factor times its own rate, biases and norms
    undecayed; the checkpoint holds the six named groups with their Adam moments; the resumed steps train at the
    straight run's rates and give its losses exactly (the moments of steps 1-3 were restored: step 4 trains at a
    nonzero rate, so steps 5 and 6 would differ without them)."""
    setup = CASES[case]  # the offload case compiles DeepSpeed's CPU Adam (scripts/setup_env.sh brings a compiler)
    from tests.commands import run_command

    from .conftest import free_port
    from .rate_probe import group_rates
    from .test_robust_training import _env, _flags

    sections = {"optimizer": setup["optimizer"]}
    if setup["scheduler"]:
        sections["scheduler"] = setup["scheduler"]
    config = _config(tmp_path, setup["script"], **sections)
    model, straight, resumed = tiny_model_dir("qwen2_5_vl"), tmp_path / "straight", tmp_path / "resumed"

    def run(out, *extra):
        flags = _flags(model, out, "--tune_mm_vision", "True", "--mm_projector_lr", "1e-2", "--vision_tower_lr",
                       "2e-4", "--weight_decay", "0.1", "--adam_beta2", "0.95", "--max_steps", "6", "--save_steps",
                       "3", *setup["flags"], "--deepspeed", config, *extra)
        env = _env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        result = run_command([sys.executable, "-m", "tests.train.rate_probe", *flags], env=env, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    first = run(straight)
    line = next(line for line in first.splitlines() if line.startswith("OPTIMIZER "))
    kind, defaults = line.split(" ", 2)[1:]
    assert kind == setup["kind"] and json.loads(defaults)["betas"] == [0.9, 0.95]
    rates, decays, losses = (group_rates(first, what) for what in ("GROUP_RATES", "GROUP_DECAY", "LOSS"))
    assert set(rates) == set(setup["factors"])
    for step, factor in setup["factors"].items():
        assert rates[step] == pytest.approx({name: factor * BASE[name.removesuffix("_no_decay")] for name in GROUPS},
                                            rel=1e-12, abs=0), step
        assert decays[step] == {name: 0.0 if name.endswith("_no_decay") else 0.1 for name in GROUPS}, step

    # The optimizer state DeepSpeed saved: the six named groups, each with its Adam moments.
    saved = torch.load(next((straight / "checkpoint-3").glob("global_step3/*optim_states.pt")),
                       weights_only=False)["optimizer_state_dict"]["optimizer_state_dict"]
    assert [(group["name"], group["weight_decay"]) for group in saved["param_groups"]] == [
        (name, 0.0 if name.endswith("_no_decay") else 0.1) for name in GROUPS]
    assert len(saved["state"]) == len(GROUPS) and all({"exp_avg", "exp_avg_sq"} <= set(state)
                                                      for state in saved["state"].values())

    second = run(resumed, "--resume_from_checkpoint", str(straight / "checkpoint-3"))
    assert f"resuming from {straight / 'checkpoint-3'}" in second
    resumed_rates, resumed_losses = group_rates(second), group_rates(second, "LOSS")
    assert set(resumed_rates) == set(resumed_losses) == {4, 5, 6}
    for step in (4, 5, 6):
        assert resumed_rates[step] == pytest.approx(rates[step], rel=1e-12, abs=0), step
        assert resumed_losses[step] == losses[step], (step, resumed_losses, losses)


# ---- Adagrad: ZeRO keeps none of the groups ----

@pytest.fixture
def base(tiny_model_dir, tmp_path):
    return ["--model_name_or_path", str(tiny_model_dir("qwen2_5_vl")), "--tune_mm_llm", "True", "--tune_mm_mlp",
            "True", "--output_dir", str(tmp_path / "out"), "--learning_rate", "1e-3"]


def test_adagrad_under_zero_is_refused_at_start_up(base, tmp_path):
    """ZeRO-1/2/3 rebuild torch's Adagrad over their flat partitions as one group with the defaults, whatever groups
    it was built over (measured, DeepSpeed 0.19.8 on CPU: ZeRO-2 and ZeRO-3 runs with an Adagrad section, and ZeRO-2
    with --optim adagrad, trained one group at --learning_rate and one weight decay, then stopped at the first step
    with "IndexError: list index out of range" in DeepSpeed's get_flat_partition).  Refused before any work; kept
    where DeepSpeed keeps the groups: with the optimizer offloaded (its CPU Adagrad) and at ZeRO stage 0."""
    adagrad = {"type": "Adagrad", "params": {"lr": "auto", "weight_decay": "auto"}}
    for script, stage in (("zero2.json", 2), ("zero3.json", 3)):
        config = _config(tmp_path, script, optimizer=adagrad)
        with pytest.raises(ConfigError) as err:
            parse_args(base + ["--deepspeed", config])
        assert (f'the DeepSpeed config {config}: its "optimizer" section (Adagrad) cannot run under ZeRO stage '
                f"{stage}: DeepSpeed rebuilds torch's Adagrad over its partitions as one parameter group") \
            in str(err.value)
        assert 'keep Adagrad with the optimizer offloaded (zero_optimization.offload_optimizer.device "cpu"' \
            in str(err.value)
    with pytest.raises(ConfigError, match=r"scripts/zero2.json: --optim adagrad cannot run under ZeRO stage 2"):
        parse_args(base + ["--deepspeed", "scripts/zero2.json", "--optim", "adagrad"])

    parse_args(base + ["--deepspeed", _config(tmp_path, "zero3_offload_optimizer.json", optimizer=adagrad)])
    stage0 = json.loads((REPO / "scripts" / "zero2.json").read_text()) | {"zero_optimization": {"stage": 0},
                                                                         "optimizer": adagrad}
    (tmp_path / "stage0.json").write_text(json.dumps(stage0))
    parse_args(base + ["--deepspeed", str(tmp_path / "stage0.json")])
    parse_args(base + ["--deepspeed", "scripts/zero2.json", "--optim", "adamw_torch"])
    # LoRA on the language model alone has one group (adapter weights): DeepSpeed's one group is it, and it
    # trains (checked by hand: ZeRO-2, --optim adagrad, 2 steps).
    parse_args(base + ["--deepspeed", "scripts/zero2.json", "--optim", "adagrad", "--lora_enable", "True",
                       "--tune_mm_mlp", "False"])
    with pytest.raises(ConfigError, match="--optim adagrad cannot run under ZeRO stage 2"):
        parse_args(base + ["--deepspeed", "scripts/zero2.json", "--optim", "adagrad", "--lora_enable", "True"])
