"""Resuming a LoRA checkpoint with other adapter flags (qwenvl/train/lora_resume.py).

A real LoRA run on the tiny qwen3_vl_moe (adapters on q_proj and v_proj and on both expert weights, merger
trained fully, alpha 8) saves checkpoint-2; each test resumes a copy of its folder with one flag changed.
Without the check, peft's loader keeps this run's config and loads by name: the tests' changes were measured
to drop adapters or the merger's training silently, or to scale the adapters by another alpha silently, or to
fail late (the optimizer's parameter groups, after run_args.json was replaced) or deep inside peft (KeyError).
"""
from __future__ import annotations

import shutil
import sys

import pytest
import torch

from qwenvl.train.arguments import ConfigError, ModelArguments
from qwenvl.train.lora_resume import check_lora_resume, layout_of
from qwenvl.train.model import lora_config, read_config, weightless_model
from tests.commands import run_command

from .conftest import free_port

CHECKPOINT_FLAGS = ["--tune_mm_llm", "True", "--tune_mm_mlp", "True", "--lora_enable", "True", "--lora_r", "4",
                    "--lora_alpha", "8", "--lora_dropout", "0", "--lora_target_modules", "q_proj,v_proj",
                    "--lora_target_parameters", "experts"]
RESUME_HINT = ("Resume it with --lora_r 4 --lora_alpha 8 --lora_target_modules q_proj,v_proj --lora_target_parameters "
               "experts --tune_mm_mlp True --tune_mm_vision False;")


def _run_flags(model_dir, out, *changed):
    """The checkpoint's flags with ``changed`` after them (the last value of a flag wins)."""
    from .test_train_qwen import _flags

    return _flags(model_dir, out, *CHECKPOINT_FLAGS, "--learning_rate", "5e-3", "--save_steps", "2",
                  "--lr_scheduler_type", "constant", *changed)


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """The output folder of a 2-step LoRA run (checkpoint-2 in it) and the model it trained."""
    from qwenvl.train.train_qwen import train

    model_dir = tiny_model_dir("qwen3_vl_moe")
    out = tmp_path_factory.mktemp("lora_resume") / "run"
    train(_run_flags(model_dir, out, "--max_steps", "2"))
    return out, model_dir


def _resume(lora_run, tmp_path, capsys, *changed):
    """Resume a copy of the run to step 3 with ``changed`` flags; returns (exit code, stderr, stdout, folder)."""
    from qwenvl.train.train_qwen import train

    source, model_dir = lora_run
    out = tmp_path / "run"
    shutil.copytree(source, out)
    capsys.readouterr()
    try:
        train(_run_flags(model_dir, out, "--max_steps", "3", *changed))
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.err, captured.out, out


def _refused_before_anything_was_written(lora_run, tmp_path, capsys, *changed) -> str:
    code, err, printed, out = _resume(lora_run, tmp_path, capsys, *changed)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert (out / "run_args.json").read_bytes() == (lora_run[0] / "run_args.json").read_bytes()
    assert not (out / "run_args.previous.json").exists() and "resuming from" not in printed
    checkpoint = out / "checkpoint-2"
    assert f"error: {checkpoint} holds LoRA adapters that this run's flags would not resume as they were trained" \
           in err
    assert ("Its adapter_config.json: r 4, lora_alpha 8, target_modules (.*\\.)?language_model\\.(.*\\.)?"
            "(q_proj|v_proj), target_parameters ['mlp.experts.down_proj', 'mlp.experts.gate_up_proj'], "
            "modules_to_save ['model.visual.deepstack_merger_list.0', 'model.visual.merger'].") in err, err
    assert RESUME_HINT in err
    return err


@pytest.mark.slow
@pytest.mark.parametrize("modules, dropped, new", [
    ("q_proj", "self_attn.v_proj (2)", None),  # today: stopped late, at the optimizer's parameter groups
    ("q_proj,k_proj", "self_attn.v_proj (2)", "self_attn.k_proj (2)"),  # same shapes: today trained on silently
])
def test_other_target_modules_are_refused_at_start_up(lora_run, tmp_path, capsys, modules, dropped, new):
    err = _refused_before_anything_was_written(lora_run, tmp_path, capsys, "--lora_target_modules", modules)
    line = next(line for line in err.splitlines() if line.startswith("  - adapters on modules"))
    assert f"only in the checkpoint, so dropped with their training: model.language_model.layers.*.{dropped}" in line
    assert (f"only in this run, so started from zero: model.language_model.layers.*.{new}" in line) == bool(new)
    assert "expert weights" not in err.split("Its adapter_config")[0]


@pytest.mark.slow
def test_other_expert_targets_are_refused_at_start_up(lora_run, tmp_path, capsys):
    err = _refused_before_anything_was_written(lora_run, tmp_path, capsys,
                                               "--lora_target_parameters", "mlp.experts.down_proj")
    assert ("  - adapters on expert weights (--lora_target_parameters): only in the checkpoint, so dropped with "
            "their training: model.language_model.layers.*.mlp.experts.gate_up_proj (2)\n") in err


@pytest.mark.slow
def test_another_alpha_is_refused_at_start_up(lora_run, tmp_path, capsys):
    """Today the saved adapters load under the new scale and the run trains on without a word."""
    err = _refused_before_anything_was_written(lora_run, tmp_path, capsys, "--lora_alpha", "16")
    assert ("  - scale: lora_alpha 8 in the checkpoint, --lora_alpha 16 in this run: from the first resumed step its "
            "adapters would act 2x as strongly as they were trained to") in err
    assert err.count("\n  - ") == 1


@pytest.mark.slow
@pytest.mark.parametrize("changed, expected", [
    # today: stopped late at the optimizer's parameter groups; without optimizer state the merger's training is lost
    (["--tune_mm_mlp", "False"], "only in the checkpoint, so dropped with their training: "
                                 "model.visual.deepstack_merger_list.*, model.visual.merger"),
    # today: KeyError 'base_model.model.model.visual.patch_embed.proj.weight' inside peft's loader
    (["--tune_mm_vision", "True"], "only in this run, so missing from the checkpoint: model.visual.blocks.* (2), "
                                   "model.visual.patch_embed, model.visual.pos_embed"),
])
def test_other_fully_trained_modules_are_refused_at_start_up(lora_run, tmp_path, capsys, changed, expected):
    err = _refused_before_anything_was_written(lora_run, tmp_path, capsys, *changed)
    assert f"  - modules trained fully (modules_to_save: --tune_mm_mlp, --tune_mm_vision): {expected}\n" in err


@pytest.mark.slow
def test_an_equivalent_spelling_resumes_as_the_original_one(lora_run, tmp_path, capsys):
    """Targets are compared as the modules and weights they resolve to: another order, the list form and the
    expert weights' names for ``experts`` resume exactly as the checkpoint's own spelling does."""
    from safetensors.torch import load_file

    code, err, _, spelled = _resume(lora_run, tmp_path / "spelled", capsys, "--lora_target_modules", "v_proj", "q_proj",
                                    "--lora_target_parameters", "mlp.experts.gate_up_proj,mlp.experts.down_proj")
    assert code == 0, err[-3000:]
    assert _resume(lora_run, tmp_path / "same", capsys)[0] == 0
    resumed, expected = load_file(spelled / "adapter_model.safetensors"), \
        load_file(tmp_path / "same" / "run" / "adapter_model.safetensors")
    saved = load_file(spelled / "checkpoint-2" / "adapter_model.safetensors")
    assert resumed.keys() == expected.keys() == saved.keys()
    assert any(".mlp.experts." in k for k in resumed) and any("merger" in k for k in resumed)
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key
    assert any(not torch.equal(resumed[k], saved[k]) for k in saved)  # step 3 trained


def _saved_adapter(folder, model_dir, make_training_args, **flags) -> str:
    """Write the adapter_config.json that peft saves for ``flags`` on a weightless model of ``model_dir``."""
    config = read_config(str(model_dir))
    model_args = ModelArguments(model_name_or_path=str(model_dir), tune_mm_llm=True)
    lora_config(weightless_model(config), model_args, make_training_args(lora_enable=True, **flags)) \
        .save_pretrained(str(folder))
    return str(folder)


def test_the_default_target_list_and_its_names_on_this_model_are_one_spelling(tiny_model_dir, make_training_args,
                                                                             tmp_path):
    """On Qwen3-VL the default list's Gated DeltaNet names match nothing: the seven names it does match resume a
    checkpoint of the default; on Qwen3.5 they leave out its linear-attention projections and are refused."""
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for model_type, same in (("qwen3_vl", True), ("qwen3_5", False)):
        model_dir = tiny_model_dir(model_type)
        checkpoint = _saved_adapter(tmp_path / model_type, model_dir, make_training_args, lora_r=4)
        model_args = ModelArguments(model_name_or_path=str(model_dir), tune_mm_llm=True)
        config = read_config(str(model_dir))
        run = make_training_args(lora_enable=True, lora_r=4, lora_target_modules=list(reversed(seven)))
        if same:
            assert check_lora_resume(checkpoint, config, model_args, run) is True
            continue
        with pytest.raises(ConfigError) as err:
            check_lora_resume(checkpoint, config, model_args, run)
        assert "only in the checkpoint, so dropped with their training: model.language_model.layers.*" \
               ".linear_attn.in_proj_a" in str(err.value)
        assert "--lora_target_modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,in_proj_qkv," \
               "in_proj_z,in_proj_b,in_proj_a,out_proj" in str(err.value)
        assert "(those are the default --lora_target_modules; without --lora_target_parameters)" in str(err.value)


def test_another_rank_is_refused_with_every_other_difference(tiny_model_dir, make_training_args, tmp_path):
    """Rank and alpha changed together (alpha = 2r is a common habit) are named in one message."""
    model_dir = tiny_model_dir("qwen2_5_vl")
    checkpoint = _saved_adapter(tmp_path, model_dir, make_training_args, lora_r=4, lora_alpha=8)
    model_args = ModelArguments(model_name_or_path=str(model_dir), tune_mm_llm=True)
    with pytest.raises(ConfigError) as err:
        check_lora_resume(checkpoint, read_config(str(model_dir)), model_args,
                          make_training_args(lora_enable=True, lora_r=8, lora_alpha=16))
    assert f"{checkpoint} holds LoRA adapters" in str(err.value)
    assert "  - rank: r 4 in the checkpoint, --lora_r 8 in this run: its adapters cannot load\n" in str(err.value)
    assert "  - scale: lora_alpha 8 in the checkpoint, --lora_alpha 16 in this run: from the first resumed step its " \
           "adapters would act 2x as strongly" in str(err.value)
    assert "Resume it with --lora_r 4 --lora_alpha 8 --lora_target_modules q_proj,k_proj" in str(err.value)
    assert "merge_lora" in str(err.value)
    assert check_lora_resume(checkpoint, None, model_args, make_training_args(lora_enable=False)) is True


def test_targets_resolve_as_peft_wraps_them(tiny_model_dir, make_training_args):
    """``layout_of`` names exactly the modules and parameters peft wraps, and the modules it trains fully."""
    from peft import get_peft_model
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper
    from peft.utils.other import ModulesToSaveWrapper

    from qwenvl.train.model import model_class_for

    model_dir = tiny_model_dir("qwen3_vl_moe")
    config = read_config(str(model_dir))
    model = model_class_for(config.model_type)(config)
    model_args = ModelArguments(model_name_or_path=str(model_dir), tune_mm_llm=True, tune_mm_vision=True)
    lora = lora_config(model, model_args, make_training_args(lora_enable=True, lora_r=2, lora_dropout=0.0,
                                                             lora_target_parameters=["experts"]))
    layout = layout_of(lora, model)
    wrapped = get_peft_model(model, lora).base_model.model

    def unwrapped(name):
        return name.replace(".base_layer", "")

    assert layout.modules == {n for n, m in wrapped.named_modules()
                              if isinstance(m, LoraLayer) and not isinstance(m, ParamWrapper)}
    assert layout.parameters == {unwrapped(f"{n}.{m.parameter_name}") for n, m in wrapped.named_modules()
                                 if isinstance(m, ParamWrapper)}
    assert layout.full == {n for n, m in wrapped.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    assert len(layout.parameters) == 2 * config.text_config.num_hidden_layers and len(layout.full) > 2


@pytest.mark.slow
def test_under_zero3_other_targets_are_refused_once_the_model_loaded(tiny_model_dir, tmp_path):
    """Under ZeRO-3 no weightless model can be built: the targets are compared on the loaded model, before LoRA
    wraps it and before any training. Today this resume trains on, the q_proj adapters' training dropped."""
    from .test_train_qwen import _env, _flags, _run

    model_dir, out = tiny_model_dir("qwen3_vl"), tmp_path / "z3"
    env = _env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    flags = _flags(model_dir, out, "--tune_mm_llm", "True", "--lora_enable", "True", "--lora_r", "4",
                   "--lora_target_modules", "q_proj", "--save_steps", "2", "--deepspeed", "scripts/zero3.json")
    _run([sys.executable, "-m", "qwenvl.train.train_qwen", *flags, "--max_steps", "2"], env)
    result = run_command([sys.executable, "-m", "qwenvl.train.train_qwen", *flags, "--max_steps", "3",
                          "--lora_target_modules", "o_proj"], env=env, timeout=900, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"error: {out / 'checkpoint-2'} holds LoRA adapters" in result.stderr
    assert "only in the checkpoint, so dropped with their training: model.language_model.layers.*.self_attn.q_proj" \
           in result.stderr and "--lora_target_modules q_proj" in result.stderr
    assert "resuming from" not in result.stdout
