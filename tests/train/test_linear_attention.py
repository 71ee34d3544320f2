"""Qwen3.5's Gated DeltaNet layers in flattened batches: no state crosses a sample boundary.

The tiny models have the released layer pattern (3 linear-attention layers, 1 full attention).
CPU, float32, no flash-linear-attention: the per-sample path.  The fla path is in
``test_linear_attention_gpu.py``.
"""
from __future__ import annotations

import json

import pytest
import torch

from qwenvl.train.arguments import ConfigError
from qwenvl.train.linear_attention import (PackedLinearAttention, PackingUnsupported, check_flattening_supported,
                                           linear_attention_modules, make_linear_attention_packable)
from tests.train.tiny_qwen35 import flattened_batch, loss_and_grads, make_samples, padded_batch, tiny_model

MODEL_TYPES = ("qwen3_5", "qwen3_5_moe")
LENGTHS = (37, 50, 21)  # not multiples of the 64-token chunk of the reference delta rule


def _max_grad_diff(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_released_layers_leak_state_across_packed_samples(model_type):
    """Why the rest exists: restarting position ids alone leave the linear-attention layers'
    state running from one sample into the next (the first sample stays exact)."""
    model = tiny_model(model_type).eval()
    samples = make_samples(model.config, (40, 40))
    with torch.no_grad():
        packed = model(**{k: v for k, v in flattened_batch(model, samples).items() if k != "labels"}).logits
        second = model(input_ids=samples[1]["input_ids"][None], use_cache=False).logits
        first = model(input_ids=samples[0]["input_ids"][None], use_cache=False).logits
    torch.testing.assert_close(packed[:, :40], first, rtol=1e-5, atol=1e-5)
    assert float((packed[:, 40:] - second).abs().max()) > 1e-3


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_flattened_equals_padded_in_loss_and_every_gradient(model_type, with_image):
    model = tiny_model(model_type)
    samples = make_samples(model.config, LENGTHS, image_at=(1,) if with_image else ())
    flat, padded = flattened_batch(model, samples), padded_batch(model, samples)
    assert ("pixel_values" in flat) == with_image

    loss_ref, grads_ref = loss_and_grads(model, padded)
    _, grads_leaky = loss_and_grads(model, flat)
    assert _max_grad_diff(grads_ref, grads_leaky) > 1e-4  # the released layers leak here ...

    assert make_linear_attention_packable(model) == 3
    loss, grads = loss_and_grads(model, flat)  # ... the boundary-aware ones do not
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    linear = [n for n in grads if ".linear_attn." in n]
    assert len(linear) == 3 * 9 and (not with_image or any(n.startswith("model.visual.") for n in grads))
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-5, msg=name)


def test_padded_batches_and_evaluation_keep_the_released_forward():
    model = tiny_model("qwen3_5")
    samples = make_samples(model.config, LENGTHS, image_at=(0,))
    padded = padded_batch(model, samples)
    before = loss_and_grads(model, padded)
    make_linear_attention_packable(model)
    after = loss_and_grads(model, padded)
    assert torch.equal(before[0], after[0])
    assert all(torch.equal(before[1][n], after[1][n]) for n in before[1])
    # Generation from a cache goes through the released forward (no boundaries there).
    model.eval()
    ids = samples[1]["input_ids"][None]
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, use_cache=True)
    assert out.shape == (1, ids.shape[1] + 3)


def test_converted_layers_keep_their_class_name_and_checkpoints_load_as_released(tmp_path):
    from transformers import AutoModelForImageTextToText, Qwen3_5ForConditionalGeneration

    model = tiny_model("qwen3_5")
    keys = list(model.state_dict())
    released_layer = type(model.model.language_model.layers[0].linear_attn)
    make_linear_attention_packable(model)
    layer = model.model.language_model.layers[0].linear_attn
    assert isinstance(layer, PackedLinearAttention) and isinstance(layer, released_layer)
    assert type(layer).__name__ == released_layer.__name__
    assert list(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(reloaded) is Qwen3_5ForConditionalGeneration
    assert not any(isinstance(m, PackedLinearAttention) for _, m in linear_attention_modules(reloaded))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_flattening_a_model_that_would_leak_is_refused(model_type):
    model = tiny_model(model_type)
    with pytest.raises(PackingUnsupported, match=r"linear-attention.*--data_flatten") as err:
        check_flattening_supported(model)
    assert isinstance(err.value, ConfigError)  # train() prints it and exits with status 2
    make_linear_attention_packable(model)
    check_flattening_supported(model)


def test_models_without_linear_attention_are_left_alone():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                            rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1],
                                                             "mrope_interleaved": True}),
                           vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=1,
                                              out_hidden_size=32, deepstack_visual_indexes=[]))
    model = Qwen3VLForConditionalGeneration(config)
    assert make_linear_attention_packable(model) == 0
    check_flattening_supported(model)


def _reference_conv(x, weight=None, bias=None, activation=None, cu_seqlens=None, **kwargs):
    """fla's ``causal_conv1d`` signature ((1, T, D) in, (out, state) back), one sample at a time."""
    outs = []
    bounds = cu_seqlens.tolist()
    for start, stop in zip(bounds[:-1], bounds[1:]):
        piece = x[:, start:stop].transpose(1, 2)
        y = torch.nn.functional.conv1d(piece, weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1,
                                       groups=piece.shape[1])[..., :stop - start]
        outs.append(torch.nn.functional.silu(y).transpose(1, 2))
    return torch.cat(outs, 1), None


def _reference_rule(q, k, v, g=None, beta=None, cu_seqlens=None, use_qk_l2norm_in_kernel=False, **kwargs):
    """fla's ``chunk_gated_delta_rule`` signature over transformers' reference, one sample at a time."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    assert q.shape[2] == v.shape[2], "the fla path repeats the grouped query/key heads itself"
    bounds = cu_seqlens.tolist()
    outs = [torch_chunk_gated_delta_rule(q[:, a:b], k[:, a:b], v[:, a:b], g=g[:, a:b], beta=beta[:, a:b],
                                         use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)[0]
            for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, 1), None


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_fla_path_plumbing_with_reference_kernels(model_type):
    """The fla forward (one varlen convolution and one varlen delta rule per layer over the whole
    row) with CPU kernels of fla's signatures: flattened == padded.  The kernels themselves are
    tested on a GPU (test_linear_attention_gpu.py)."""
    calls = []

    def rule(*args, **kwargs):
        calls.append(kwargs["cu_seqlens"].numel() - 1)
        return _reference_rule(*args, **kwargs)

    model = tiny_model(model_type)
    samples = make_samples(model.config, LENGTHS, image_at=(1,))
    loss_ref, grads_ref = loss_and_grads(model, padded_batch(model, samples))
    make_linear_attention_packable(model, backend="fla", varlen_kernels=(_reference_conv, rule))
    loss, grads = loss_and_grads(model, flattened_batch(model, samples))
    assert calls == [3, 3, 3]  # one call per linear-attention layer, three samples each
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-5, msg=name)


def test_the_fla_backend_says_what_it_needs_on_cpu():
    model = tiny_model("qwen3_5")
    make_linear_attention_packable(model, backend="fla")
    batch = flattened_batch(model, make_samples(model.config, (10, 12)))
    with pytest.raises(RuntimeError, match="flash-linear-attention and a CUDA device"):
        model(**batch)


def test_load_model_makes_qwen3_5_packable(tmp_path):
    """The training loader converts the layers (and the entry point's check then passes)."""
    from qwenvl.train.arguments import parse_args
    from qwenvl.train.model import load_model

    tiny_model("qwen3_5").save_pretrained(tmp_path / "model")
    args = parse_args(["--model_name_or_path", str(tmp_path / "model"), "--output_dir", str(tmp_path / "out"),
                       "--tune_mm_llm", "True"])
    model = load_model(args.model, args.training)
    assert len(linear_attention_modules(model)) == 3
    check_flattening_supported(model)


@pytest.mark.slow
def test_compiled_layers_keep_packed_samples_apart():
    """--compile_layers: the boundary-aware part runs eagerly inside each compiled decoder layer
    (aot_eager here: the tracing, not the CPU code generation, is what is tested)."""
    from qwenvl.train.compile import repeated_layers

    model = tiny_model("qwen3_5")
    samples = make_samples(model.config, LENGTHS, image_at=(1,))
    loss_ref, grads_ref = loss_and_grads(model, padded_batch(model, samples))
    make_linear_attention_packable(model)
    for _, layer in repeated_layers(model):
        layer.compile(backend="aot_eager", dynamic=True)
    loss, grads = loss_and_grads(model, flattened_batch(model, samples))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_fused_loss_training_subclass_on_flattened_qwen3_5(model_type):
    """The class load_model trains (fused loss; router loss for MoE) on a flattened batch equals
    the released class on the padded one, router loss included."""
    from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

    from qwenvl.train.fused_loss import with_training_forward

    released = Qwen3_5ForConditionalGeneration if model_type == "qwen3_5" else Qwen3_5MoeForConditionalGeneration
    moe = model_type.endswith("moe")
    training = tiny_model(model_type, cls=with_training_forward(released, fused_loss=True, router_aux_loss=moe))
    reference = tiny_model(model_type, cls=with_training_forward(released, fused_loss=False, router_aux_loss=moe))
    samples = make_samples(training.config, LENGTHS, image_at=(2,))
    make_linear_attention_packable(training)
    loss, grads = loss_and_grads(training, flattened_batch(training, samples))
    loss_ref, grads_ref = loss_and_grads(reference, padded_batch(reference, samples))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)
