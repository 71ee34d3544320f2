"""Loading by config, attention choice, freezing in every flag combination, LoRA wrapping."""
from __future__ import annotations

import itertools
import shutil

import pytest
import torch

from qwenvl.train.arguments import ConfigError, ModelArguments, parse_args
from qwenvl.train.model import (COMPONENT_TITLES, apply_tuning, component_of, full_training_modules, load_model,
                                model_class_for, parameter_counts, parameter_table, prepare_model,
                                resolve_attn_implementation)
from qwenvl.tools.make_tiny_model import model_class

COMBOS = list(itertools.product([False, True], repeat=3))  # (llm, mlp, vision)


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """One loaded model per family, reused (each test sets requires_grad itself)."""
    from transformers import AutoModelForImageTextToText

    return {t: AutoModelForImageTextToText.from_pretrained(tiny_model_dir(t))
            for t in ("qwen2_5_vl", "qwen3_vl", "qwen3_5")}


def _args(path, tmp_path, *flags):
    return parse_args(["--model_name_or_path", str(path), "--output_dir", str(tmp_path / "out"), *flags])


def test_component_rules():
    assert component_of("model.visual.merger.mlp.0.weight") == "merger"
    assert component_of("model.visual.deepstack_merger_list.1.norm.weight") == "merger"
    assert component_of("model.visual.blocks.3.attn.qkv.weight") == "vision"
    assert component_of("model.visual.patch_embed.proj.weight") == "vision"
    assert component_of("model.language_model.embed_tokens.weight") == "llm"
    assert component_of("lm_head.weight") == "lm_head"
    # LoRA and modules_to_save names carry prefixes and infixes
    assert component_of("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight") == "llm"
    assert component_of("base_model.model.model.visual.merger.modules_to_save.default.ln_q.weight") == "merger"
    with pytest.raises(ValueError, match="no component rule"):
        component_of("something.else.weight")


def test_class_comes_from_the_config_not_the_directory_name(tiny_model_dir, tmp_path):
    misleading = tmp_path / "Qwen3-VL-30B-A3B-qwen3-vl"
    shutil.copytree(tiny_model_dir("qwen2_5_vl"), misleading)
    args = _args(misleading, tmp_path, "--tune_mm_llm", "True")
    model = load_model(args.model, args.training)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == resolve_attn_implementation(None) == "sdpa"  # CPU, no flash_attn


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_vl_moe", "qwen3_5_moe"])
def test_other_families_load(tiny_model_dir, tmp_path, model_type):
    args = _args(tiny_model_dir(model_type), tmp_path, "--tune_mm_llm", "True", "--attn_implementation", "eager")
    model = load_model(args.model, args.training)
    assert isinstance(model, model_class(model_type))
    assert model.config._attn_implementation == "eager"


def test_unsupported_model_type(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("llava").save_pretrained(tmp_path / "llava")
    args = _args(tmp_path / "llava", tmp_path, "--tune_mm_llm", "True")
    with pytest.raises(ConfigError, match="'llava' is not supported.*qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe"):
        load_model(args.model, args.training)
    with pytest.raises(ConfigError, match="supported model types"):
        model_class_for("qwen2")


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
@pytest.mark.parametrize("llm,mlp,vision", COMBOS)
def test_freezing_every_combination(models, model_type, llm, mlp, vision):
    model = models[model_type]
    apply_tuning(model, ModelArguments(tune_mm_llm=llm, tune_mm_mlp=mlp, tune_mm_vision=vision))
    wanted = {"llm": llm, "lm_head": llm, "merger": mlp, "vision": vision}
    for name, param in model.named_parameters():
        assert param.requires_grad == wanted[component_of(name)], name
    # the named modules, checked directly
    visual = model.model.visual
    assert all(p.requires_grad == mlp for p in visual.merger.parameters())
    if model_type == "qwen3_vl":
        assert all(p.requires_grad == mlp for p in visual.deepstack_merger_list.parameters())
    if model_type.startswith("qwen3"):  # Qwen3-VL and Qwen3.5 (no DeepStack there): learnt positions
        assert visual.pos_embed.weight.requires_grad == vision
    assert all(p.requires_grad == vision for p in visual.blocks.parameters())
    assert all(p.requires_grad == vision for p in visual.patch_embed.parameters())
    assert model.model.language_model.embed_tokens.weight.requires_grad == llm
    assert model.lm_head.weight.requires_grad == llm  # tied: the same tensor
    assert model.model.language_model.norm.weight.requires_grad == llm

    counts = parameter_counts(model)
    assert sum(r["total"] for r in counts.values()) == sum(p.numel() for p in model.parameters())
    assert sum(r["trainable"] for r in counts.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["merger"]["trainable"] == (counts["merger"]["total"] if mlp else 0)
    assert counts["vision"]["trainable"] == (counts["vision"]["total"] if vision else 0)
    table = parameter_table(model)
    assert all(title in table for title in COMPONENT_TITLES.values()) and "tied" in table


def test_untied_lm_head(untied_model_dir, tmp_path):
    args = _args(untied_model_dir, tmp_path, "--tune_mm_mlp", "True")
    model = prepare_model(load_model(args.model, args.training), args.model, args.training)
    assert not model.lm_head.weight.requires_grad and not model.model.language_model.embed_tokens.weight.requires_grad
    counts = parameter_counts(model)
    assert counts["lm_head"]["total"] == model.lm_head.weight.numel() and counts["lm_head"]["trainable"] == 0
    apply_tuning(model, ModelArguments(tune_mm_llm=True))
    assert model.lm_head.weight.requires_grad
    assert parameter_counts(model)["lm_head"]["trainable"] == model.lm_head.weight.numel()
    assert "tied" not in parameter_table(model)


def test_half_precision_loads_half_and_trains_float32(tiny_model_dir, tmp_path):
    args = _args(tiny_model_dir("qwen2_5_vl"), tmp_path, "--tune_mm_mlp", "True", "--bf16", "True",
                 "--use_cpu", "True")
    model = prepare_model(load_model(args.model, args.training), args.model, args.training)
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
    assert model.config.text_config.use_cache is False


def test_lora_rule(tiny_model_dir, tmp_path):
    from peft import PeftModel

    args = _args(tiny_model_dir("qwen3_vl"), tmp_path, "--tune_mm_llm", "True", "--tune_mm_mlp", "True",
                 "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8")
    model = prepare_model(load_model(args.model, args.training), args.model, args.training)
    assert isinstance(model, PeftModel)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    # adapters on the 7 projections of each of the 2 language-model layers, A and B
    assert len(lora) == 2 * 7 * 2 and all(component_of(n) == "llm" for n in lora)
    # the merger and the deepstack mergers train fully; nothing else does
    assert {component_of(n) for n in trainable if "lora_" not in n} == {"merger"}
    assert all(".modules_to_save." in n for n in trainable if "lora_" not in n)
    assert not any(component_of(n) == "vision" for n in trainable)
    embed = model.get_input_embeddings().weight
    assert not embed.requires_grad


def test_lora_full_training_modules_expand_module_lists(models):
    model = models["qwen3_vl"]
    names = full_training_modules(model, ModelArguments(tune_mm_llm=True, tune_mm_mlp=True, tune_mm_vision=True))
    assert "model.visual.merger" in names and "model.visual.deepstack_merger_list.0" in names
    assert "model.visual.blocks.0" in names and "model.visual.blocks.1" in names
    assert "model.visual.patch_embed" in names and "model.visual.pos_embed" in names
    assert full_training_modules(model, ModelArguments(tune_mm_llm=True)) == []


def test_lora_targets_that_match_nothing(tiny_model_dir, tmp_path):
    args = _args(tiny_model_dir("qwen2_5_vl"), tmp_path, "--tune_mm_llm", "True", "--lora_enable", "True",
                 "--lora_target_modules", "qkv", "fc1")
    with pytest.raises(ConfigError, match="matches no module of the language model.*q_proj"):
        prepare_model(load_model(args.model, args.training), args.model, args.training)


def test_lora_on_moe_targets_attention(tiny_model_dir, tmp_path):
    args = _args(tiny_model_dir("qwen3_vl_moe"), tmp_path, "--tune_mm_llm", "True", "--lora_enable", "True",
                 "--lora_r", "2")
    model = prepare_model(load_model(args.model, args.training), args.model, args.training)
    lora = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if "lora_" in n}
    assert lora == {"q_proj", "k_proj", "v_proj", "o_proj"}
