"""Optimizer groups: learning rates per component, weight decay, one group per parameter."""
from __future__ import annotations

import pytest

from qwenvl.train.arguments import ConfigError, ModelArguments, TrainingArguments
from qwenvl.train.model import apply_tuning, component_of
from qwenvl.train.optim import build_param_groups, describe_groups, no_decay_parameter_names


@pytest.fixture(scope="module")
def models(tiny_model_dir, untied_model_dir):
    from transformers import AutoModelForImageTextToText

    found = {t: AutoModelForImageTextToText.from_pretrained(tiny_model_dir(t))
             for t in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")}
    found["untied"] = AutoModelForImageTextToText.from_pretrained(untied_model_dir)
    return found


def _targs(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path), report_to="none", learning_rate=1e-5, weight_decay=0.1, **kw)


def _check_partition(model, groups):
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) and set(seen) == trainable


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe",
                                        "untied"])
@pytest.mark.parametrize("vision_lr,merger_lr", [(None, None), (2e-6, None), (None, 3e-4), (2e-6, 3e-4)])
def test_group_learning_rates(models, tmp_path, model_type, vision_lr, merger_lr):
    model = models[model_type]
    apply_tuning(model, ModelArguments(tune_mm_llm=True, tune_mm_mlp=True, tune_mm_vision=True))
    groups = build_param_groups(model, _targs(tmp_path, vision_tower_lr=vision_lr, mm_projector_lr=merger_lr))
    _check_partition(model, groups)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"llm", "llm_no_decay", "merger", "merger_no_decay", "vision", "vision_no_decay"}
    assert groups[0]["name"] == "llm"  # the Trainer's "learning_rate" log is group 0's
    assert by_name["llm"]["lr"] == by_name["llm_no_decay"]["lr"] == 1e-5
    assert by_name["merger"]["lr"] == by_name["merger_no_decay"]["lr"] == (merger_lr or 1e-5)
    assert by_name["vision"]["lr"] == by_name["vision_no_decay"]["lr"] == (vision_lr or 1e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for p in group["params"]:
            assert group["name"].removesuffix("_no_decay") == {"lm_head": "llm"}.get(
                component_of(names[id(p)]), component_of(names[id(p)]))
    if model_type == "untied":
        assert any(names[id(p)] == "lm_head.weight" for p in by_name["llm"]["params"])
    assert "llm_no_decay" in describe_groups(groups)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_no_decay_on_biases_and_norms(models, tmp_path, model_type):
    model = models[model_type]
    apply_tuning(model, ModelArguments(tune_mm_llm=True, tune_mm_mlp=True, tune_mm_vision=True))
    groups = build_param_groups(model, _targs(tmp_path))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    undecayed = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all(g["weight_decay"] == (0.0 if g["name"].endswith("_no_decay") else 0.1) for g in groups)
    assert not any(n.endswith(".bias") for n in decayed)
    assert not any("norm" in n.rsplit(".", 2)[-2] for n in decayed)  # *norm*, *layernorm.weight
    assert "model.language_model.norm.weight" in undecayed
    assert "model.language_model.layers.0.input_layernorm.weight" in undecayed
    assert "model.language_model.embed_tokens.weight" in decayed  # embeddings decay, as the official code
    assert "model.visual.patch_embed.proj.weight" in decayed
    if model_type == "qwen2_5_vl":
        assert "model.visual.merger.ln_q.weight" in undecayed  # an RMSNorm not named *norm*: found by type
    if model_type == "qwen2_vl":
        assert "model.visual.merger.ln_q.bias" in undecayed
    if model_type == "qwen3_5":
        # Gated DeltaNet: its gated RMSNorm, and the decay parameters A_log and dt_bias.
        linear = "model.language_model.layers.0.linear_attn."
        assert {linear + "norm.weight", linear + "A_log", linear + "dt_bias"} <= undecayed
        assert linear + "in_proj_qkv.weight" in decayed
    assert undecayed == no_decay_parameter_names(model) & (decayed | undecayed)


def test_only_trainable_parameters_and_requested_rates_must_match(models, tmp_path):
    model = models["qwen2_5_vl"]
    apply_tuning(model, ModelArguments(tune_mm_mlp=True))
    groups = build_param_groups(model, _targs(tmp_path, mm_projector_lr=1e-4))
    assert [g["name"] for g in groups] == ["merger", "merger_no_decay"]
    _check_partition(model, groups)
    with pytest.raises(ConfigError, match="--vision_tower_lr is set but no trainable parameter"):
        build_param_groups(model, _targs(tmp_path, vision_tower_lr=1e-6))
