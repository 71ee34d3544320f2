"""MoE models train with the router load-balancing loss: added to the loss on both loss paths,
changing the router's gradients, its coefficient a flag (default: the checkpoint's), logged."""
from __future__ import annotations

import json

import pytest
import torch

from qwenvl.train.arguments import ConfigError, ModelArguments, parse_args
from qwenvl.train.fused_loss import with_training_forward
from qwenvl.train.model import load_model, prepare_model
from qwenvl.train.trainer import QwenVLTrainer
from tests.train.conftest import ChatCollator, conversations, load_processor
from tests.train.tiny_qwen35 import make_samples, padded_batch, tiny_model


@pytest.fixture(scope="module")
def moe_dirs(tiny_model_dir, tmp_path_factory):
    """{model_type: checkpoint dir} for tiny qwen3_vl_moe and qwen3_5_moe models."""
    qwen35 = tmp_path_factory.mktemp("qwen3_5_moe")
    tiny_model("qwen3_5_moe").save_pretrained(qwen35)
    return {"qwen3_vl_moe": tiny_model_dir("qwen3_vl_moe"), "qwen3_5_moe": qwen35}


def _released_class(path):
    from transformers import AutoConfig

    from qwenvl.train.model import model_class_for

    return model_class_for(AutoConfig.from_pretrained(path).model_type)


def _run(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    router = {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    return out, router


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "released_loss"])
@pytest.mark.parametrize("model_type", ["qwen3_5_moe", "qwen3_vl_moe"])
def test_router_loss_is_added_and_changes_router_gradients(moe_dirs, model_type, fused):
    path = moe_dirs[model_type]
    cls = _released_class(path)
    with_aux = with_training_forward(cls, fused_loss=fused, router_aux_loss=True).from_pretrained(path).train()
    without = with_training_forward(cls, fused_loss=fused).from_pretrained(path).train()
    coef = with_aux.config.get_text_config().router_aux_loss_coef
    assert coef == pytest.approx(0.001)  # the released default
    batch = padded_batch(with_aux, make_samples(with_aux.config, (30, 18, 25)))

    out, router = _run(with_aux, batch)
    out_plain, router_plain = _run(without, batch)
    assert out_plain.aux_loss is None and float(out.aux_loss.detach()) > 0
    torch.testing.assert_close(out.loss, out_plain.loss + coef * out.aux_loss, rtol=1e-6, atol=1e-7)
    assert len(router) == with_aux.config.get_text_config().num_hidden_layers
    for name in router:
        assert not torch.allclose(router[name], router_plain[name], rtol=0, atol=1e-9), name
    assert not with_aux.config.get_text_config().output_router_logits  # inference config untouched


def test_fused_and_released_loss_paths_agree_with_the_router_loss(moe_dirs):
    path = moe_dirs["qwen3_5_moe"]
    cls = _released_class(path)
    fused = with_training_forward(cls, fused_loss=True, router_aux_loss=True).from_pretrained(path).train()
    released = with_training_forward(cls, fused_loss=False, router_aux_loss=True).from_pretrained(path).train()
    batch = padded_batch(fused, make_samples(fused.config, (30, 18)))
    (a, ga), (b, gb) = _run(fused, batch), _run(released, batch)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.aux_loss, b.aux_loss)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-7)


def _load(path, tmp_path, *flags):
    args = parse_args(["--model_name_or_path", str(path), "--output_dir", str(tmp_path / "out"),
                       "--tune_mm_llm", "True", *flags])
    return load_model(args.model, args.training)


@pytest.mark.parametrize("flags,coef", [((), 0.001), (("--router_aux_loss_coef", "0.02"), 0.02),
                                        (("--router_aux_loss_coef", "0"), 0.0)])
def test_coefficient_flag(moe_dirs, tmp_path, flags, coef):
    model = _load(moe_dirs["qwen3_5_moe"], tmp_path, *flags)
    assert getattr(model, "router_aux_loss", False) == bool(coef)
    if coef:
        assert model.config.get_text_config().router_aux_loss_coef == coef


def test_negative_coefficient_is_refused(moe_dirs, tmp_path):
    with pytest.raises(ConfigError, match="router_aux_loss_coef must be >= 0"):
        _load(moe_dirs["qwen3_5_moe"], tmp_path, "--router_aux_loss_coef", "-1")


def test_dense_models_have_no_router_loss(tiny_model_dir, tmp_path):
    model = _load(tiny_model_dir("qwen3_vl"), tmp_path, "--loss_kernel", "model")
    assert not getattr(model, "router_aux_loss", False)


def test_training_logs_the_router_loss_and_saves_the_inference_config(moe_dirs, make_training_args, tmp_path):
    path = moe_dirs["qwen3_vl_moe"]
    training_args = make_training_args(max_steps=2)
    model_args = ModelArguments(model_name_or_path=str(path), tune_mm_llm=True)
    model = prepare_model(load_model(model_args, training_args), model_args, training_args)
    processor = load_processor(path)
    trainer = QwenVLTrainer(model=model, args=training_args, processing_class=processor,
                            train_dataset=conversations(4), data_collator=ChatCollator(processor))
    trainer.train()
    logged = [h["router_aux_loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(v > 0 for v in logged)
    trainer.save_model(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["text_config"]["output_router_logits"] is False


def _lora_targets(model) -> set[str]:
    return {n.split(".lora_A")[0].split(".layers.")[1].split(".", 1)[1] for n, _ in model.named_parameters()
            if ".lora_A." in n}


def test_lora_targets_on_qwen3_5_moe(moe_dirs, tmp_path):
    """What the README says: the default targets reach the full-attention projections, the
    Gated DeltaNet projections and the shared expert; the routed experts (fused 3-D weights) are
    never LoRA targets; naming targets narrows them."""
    from tests.train.tiny_qwen35 import flattened_batch, loss_and_grads

    path = moe_dirs["qwen3_5_moe"]
    lora = ("--lora_enable", "True", "--lora_r", "2")
    args = parse_args(["--model_name_or_path", str(path), "--output_dir", str(tmp_path / "out"),
                       "--tune_mm_llm", "True", *lora])
    default = prepare_model(load_model(args.model, args.training), args.model, args.training)
    assert _lora_targets(default) == {f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
        f"mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")} | {
        f"linear_attn.{p}" for p in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")}
    # every decoder layer has adapters (3 of 4 are linear-attention layers)
    layers = {n.split(".layers.")[1].split(".")[0] for n, _ in default.named_parameters() if ".lora_A." in n}
    assert len(layers) == default.config.text_config.num_hidden_layers
    args = parse_args(["--model_name_or_path", str(path), "--output_dir", str(tmp_path / "out"),
                       "--tune_mm_llm", "True", *lora, "--lora_target_modules", "q_proj", "in_proj_qkv",
                       "in_proj_z", "out_proj"])
    named = prepare_model(load_model(args.model, args.training), args.model, args.training)
    assert _lora_targets(named) == {"self_attn.q_proj", "linear_attn.in_proj_qkv", "linear_attn.in_proj_z",
                                    "linear_attn.out_proj"}
    # a flattened batch trains through the adapters (the packed layers are unchanged by peft)
    batch = flattened_batch(named.base_model.model, make_samples(named.config, (20, 30)))
    loss, grads = loss_and_grads(named, batch)
    assert any(".linear_attn.in_proj_qkv.lora_B" in n for n in grads) and torch.isfinite(loss)
