"""parse_args: the command line, run files, overrides, and every problem reported at once."""
from __future__ import annotations

import json
import pickle

import pytest

from qwenvl.train.arguments import DEFAULT_LORA_TARGETS, ConfigError, TrainingArguments, parse_args


@pytest.fixture
def base(tiny_model_dir, tmp_path):
    """The smallest valid flag list."""
    return ["--model_name_or_path", str(tiny_model_dir("qwen2_5_vl")), "--tune_mm_llm", "True",
            "--output_dir", str(tmp_path / "out")]


def test_defaults_follow_the_official_code(base):
    model, data, training, _ = parse_args(base[:2] + ["--tune_mm_mlp", "True"])
    assert (model.tune_mm_llm, model.tune_mm_mlp, model.tune_mm_vision) == (False, True, False)
    assert model.attn_implementation is None
    assert training.model_max_length == 512 and training.optim == "adamw_torch"
    assert training.mm_projector_lr is None and training.vision_tower_lr is None
    assert (training.lora_enable, training.lora_r, training.lora_alpha, training.lora_dropout) == (False, 64, 128, 0.05)
    assert training.lora_target_modules == DEFAULT_LORA_TARGETS
    assert training.remove_unused_columns is False
    assert data.max_pixels == 28 * 28 * 576


def test_cli_values_and_last_repeated_flag_wins(base):
    model, data, training, explicit = parse_args(base + [
        "--learning_rate", "1e-5", "--learning_rate", "2e-5", "--tune_mm_mlp", "True", "--mm_projector_lr", "1e-4",
        "--max_pixels", "50176", "--min_pixels", "784", "--lora_target_modules", "q_proj,v_proj", "o_proj",
        "--warmup_ratio", "0.03"])
    assert training.learning_rate == 2e-5 and training.mm_projector_lr == 1e-4
    assert data.max_pixels == 50176 and data.min_pixels == 784
    assert training.lora_target_modules == ["q_proj", "v_proj", "o_proj"]
    assert training.warmup_steps == 0.03  # transformers 5 reads a value below 1 as a fraction of the run
    assert explicit["learning_rate"] == 2e-5 and explicit["tune_mm_mlp"] is True
    assert "seed" not in explicit  # only what the user gave


def test_json_run_file(base, tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"model_name_or_path": base[1], "tune_mm_llm": True, "tune_mm_vision": True,
                               "vision_tower_lr": 1e-6, "output_dir": base[-1], "per_device_train_batch_size": 3,
                               "dataset_use": "demo_shapes%50"}))
    model, data, training, explicit = parse_args([str(run)])
    assert model.tune_mm_vision and training.vision_tower_lr == 1e-6
    assert training.per_device_train_batch_size == 3 and data.dataset_use == "demo_shapes%50"
    assert explicit["vision_tower_lr"] == 1e-6


def test_yaml_run_file_with_overrides(base, tmp_path):
    run = tmp_path / "run.yaml"
    # YAML reads 1e-5 as a string; it is converted like a flag value.
    run.write_text(f"model_name_or_path: {base[1]}\ntune_mm_llm: true\noutput_dir: {base[-1]}\n"
                   "learning_rate: 1e-5\nbf16: false\nnum_train_epochs: 2\n")
    _, _, training, _ = parse_args([str(run), "--num_train_epochs", "3"])
    assert training.learning_rate == 1e-5 and training.num_train_epochs == 3


def test_run_file_unknown_keys_and_bad_file(base, tmp_path):
    run = tmp_path / "run.yml"
    run.write_text(f"model_name_or_path: {base[1]}\ntune_mm_llm: true\nlearning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key.*learning_rat"):
        parse_args([str(run)])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read run file"):
        parse_args([str(tmp_path / "bad.json")])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args([str(tmp_path / "missing.yaml")])


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_args(["--model_name_or_path", str(tmp_path / "no_such_model"), "--vision_tower_lr", "1e-5",
                    "--mm_projector_lr", "1e-4", "--bf16", "True", "--fp16", "True",
                    "--deepspeed", str(tmp_path / "missing.json"), "--lora_enable", "True",
                    "--min_pixels", "100", "--max_pixels", "10", "--no_such_flag", "1",
                    "--output_dir", str(tmp_path / "out")])
    problems = err.value.problems
    text = str(err.value)
    # (--vision_tower_lr / --mm_projector_lr for frozen components are warnings, not problems:
    # tests/train/test_official_flags.py)
    expected = ["nothing to train", "--lora_enable puts adapters", "--bf16 and --fp16", "--deepspeed",
                "no such directory", "--min_pixels 100 is above", "--no_such_flag"]
    for fragment in expected:
        assert fragment in text, fragment
    assert len(problems) >= len(expected)
    assert text.startswith(f"{len(problems)} problems")
    # each problem says how to fix it
    assert "Set at least one to True" in text and "choose one" in text


def test_lora_value_checks(base):
    with pytest.raises(ConfigError) as err:
        parse_args(base + ["--lora_enable", "True", "--lora_r", "0", "--lora_dropout", "1.5"])
    assert "--lora_r must be positive" in str(err.value) and "--lora_dropout" in str(err.value)


def test_flash_attention_needs_cuda_and_flash_attn(base, monkeypatch):
    import qwenvl.train.arguments as arguments

    monkeypatch.setattr(arguments, "flash_attn_available", lambda: False)
    with pytest.raises(ConfigError, match="flash_attention_2 needs"):
        parse_args(base + ["--attn_implementation", "flash_attention_2"])
    assert parse_args(base + ["--attn_implementation", "eager"]).model.attn_implementation == "eager"


def test_warmup_ratio_and_steps_conflict(base):
    with pytest.raises(ConfigError, match="give one"):
        parse_args(base + ["--warmup_ratio", "0.1", "--warmup_steps", "5"])


def test_invalid_value_is_a_config_error_not_an_exit(base):
    with pytest.raises(ConfigError, match="learning_rate"):
        parse_args(base + ["--learning_rate", "fast"])


def test_hub_token_stays_out_of_the_pickled_arguments(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), hub_token="hf_secret", report_to="none")
    blob = pickle.dumps(args)
    assert b"hf_secret" not in blob
    assert pickle.loads(blob).hub_token is None
    assert args.hub_token == "hf_secret"  # the live object keeps it for push_to_hub


def test_compile_layers_is_refused_under_zero3_only(base):
    repo = __import__("pathlib").Path(__file__).resolve().parents[2]
    with pytest.raises(ConfigError, match="--compile_layers cannot run under ZeRO-3"):
        parse_args(base + ["--compile_layers", "True", "--deepspeed", str(repo / "scripts/zero3.json")])
    assert parse_args(base + ["--compile_layers", "True", "--deepspeed",
                              str(repo / "scripts/zero2.json")]).training.compile_layers


def test_selective_checkpointing_flag_reaches_the_trainer_arguments(base):
    """transformers' own --activation_checkpointing_kwargs (every_n_layers) passes through as a dict."""
    training = parse_args(base + ["--gradient_checkpointing", "True", "--activation_checkpointing_kwargs",
                                  '{"every_n_layers": 3}']).training
    assert training.activation_checkpointing_kwargs == {"every_n_layers": 3}


@pytest.mark.parametrize("flags, message", [
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1, got 0"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1, got 0"),
    (["--max_steps", "0"], "--max_steps 0 trains nothing"),
    (["--num_train_epochs", "0"], "--num_train_epochs 0.0 trains nothing"),
    (["--eval_strategy", "steps"], "--eval_strategy steps needs evaluation data: name it with --eval_dataset_use"),
    (["--save_strategy", "best"], "--save_strategy best saves when --metric_for_best_model improves: name it"),
    (["--save_strategy", "best", "--metric_for_best_model", "loss"],
     "--save_strategy best compares evaluations: name the evaluation data with --eval_dataset_use"),
    (["--output_dir", ""], "--output_dir is empty: give the folder"),
    (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size must be at least 1, got 0"),
    (["--dataloader_num_workers", "-1"], "--dataloader_num_workers must be 0 (load in the training process) or more"),
    (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
    (["--attn_implementation", "flash_attn2"], "--attn_implementation flash_attn2 is not an attention kernel"),
    (["--report_to", "wandb,tensorbord"], "--report_to tensorbord: unknown; use none, all, or any of"),
])
def test_a_run_that_cannot_train_is_refused_before_it_starts(base, flags, message):
    """The Trainer took these without a word (an untrained model saved as the result, one step for --max_steps 0)
    or failed deep inside (a division by zero, the sampler's error, its own eval and best-model checks after the
    model loaded, os.makedirs('') after the data was built)."""
    with pytest.raises(ConfigError) as err:
        parse_args(base + flags)
    assert message in str(err.value)
    # the valid neighbours still pass
    assert parse_args(base + ["--max_steps", "3", "--num_train_epochs", "0"]).training.max_steps == 3
    assert parse_args(base + ["--eval_strategy", "no"]).training.eval_strategy.value == "no"
    for attn in ("sdpa", "eager", "flash_varlen_torch", "flex_attention", "paged|eager"):
        assert parse_args(base + ["--attn_implementation", attn]).model.attn_implementation == attn
    assert parse_args(base + ["--report_to", "tensorboard,wandb"]).training.report_to == ["tensorboard", "wandb"]


def test_a_weights_file_for_the_model_folder_names_the_folder(base):
    weights = f"{base[1]}/model.safetensors"
    with pytest.raises(ConfigError, match=f"--model_name_or_path {weights} is a file: give the folder"):
        parse_args(["--model_name_or_path", weights] + base[2:])


def test_a_negative_value_after_a_space_says_how_to_write_it(base):
    """argparse reads "-1e-5" as a flag: the message said only "expected one argument"."""
    with pytest.raises(ConfigError, match="is written with '=': --flag=-1e-5"):
        parse_args(base + ["--learning_rate", "-1e-5"])
    with pytest.raises(ConfigError, match="--learning_rate must be positive, got -1e-05"):
        parse_args(base + ["--learning_rate=-1e-5"])


@pytest.mark.parametrize("batching, words", [
    (["--data_flatten", "True", "--max_tokens_per_batch", "4096"], "made by the token budget"),
    (["--data_flatten", "True", "--token_budget_samples", "8"], "lower --max_tokens_per_batch (or"),
    (["--group_by_modality_length", "True"], "made by the length-grouping sampler"),
    (["--train_sampling_strategy", "group_by_length"], "lower --per_device_train_batch_size"),
])
def test_auto_find_batch_size_is_refused_where_the_batches_do_not_follow_the_batch_size(base, batching, words):
    """transformers' retry after an out-of-memory error halves the Trainer's batch size, which these samplers
    never read: the retries would fail alike, then end in "No executable batch size found"."""
    with pytest.raises(ConfigError) as err:
        parse_args(base + batching + ["--auto_find_batch_size", "True"])
    assert "--auto_find_batch_size halves --per_device_train_batch_size" in str(err.value)
    assert words in str(err.value)
    parse_args(base + batching)  # fine without it
    # The Trainer's own sampler reads the halved size: kept.
    assert parse_args(base + ["--auto_find_batch_size", "True"]).training.auto_find_batch_size
