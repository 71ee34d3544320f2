"""Where flash-linear-attention's gated delta rule cannot run a backward (Hopper with Triton
3.4.0 to 3.7.0 and no tilelang: fla raises at the first backward), packed rows avoid fla and
padded training is refused at start-up.

CPU: the decision is a function of its inputs (compute capability, device name, Triton version,
tilelang), and the layers take the reason they were loaded with; the GPU side (that fla really
raises exactly when the decision says so) is in ``test_linear_attention_gpu.py``.
"""
from __future__ import annotations

import importlib
import inspect
import logging

import pytest
import torch

from qwenvl.train import linear_attention
from qwenvl.train.arguments import ConfigError
from qwenvl.train.linear_attention import (FlaCannotTrain, check_linear_attention_trainable, fla_backward_blocker,
                                           linear_attention_modules, make_linear_attention_packable)
from tests.train.tiny_qwen35 import flattened_batch, loss_and_grads, make_samples, padded_batch, tiny_model

H200, H100, A100, B200 = "NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA B200"
REASON = fla_backward_blocker((9, 0), H200, "3.6.0", tilelang_usable=False)
LENGTHS = (37, 50, 21)


def _ours(caplog) -> list[str]:
    """Our warnings (transformers logs its own fallbacks on CPU too)."""
    return [r.getMessage() for r in caplog.records if r.name == linear_attention.__name__]


@pytest.fixture(autouse=True)
def _fresh_warning():
    """The warning is once per process; each test starts before it."""
    linear_attention._WARNED.clear()
    yield
    linear_attention._WARNED.clear()


@pytest.mark.parametrize("capability,name,triton,tilelang", [
    ((9, 0), H200, "3.6.0", False),  # the H200 this was found on (torch 2.11)
    ((9, 0), H100, "3.4.0", False),  # first bad release
    ((9, 0), H100, "3.7.0", False),
    ((9, 0), H100, "3.7.1rc1", False),  # before 3.7.1, as fla's packaging comparison says
])
def test_hopper_with_the_triton_releases_of_fla_issue_640_blocks_the_backward(capability, name, triton, tilelang):
    reason = fla_backward_blocker(capability, name, triton, tilelang)
    assert reason is not None and f"Triton {triton}" in reason and name in reason and "#640" in reason


@pytest.mark.parametrize("capability,name,triton,tilelang", [
    ((9, 0), H200, "3.6.0", True),  # fla's TileLang backend takes the kernel over
    ((9, 0), H200, "3.7.1", False),  # fixed
    ((9, 0), H200, "3.8.0", False),
    ((9, 0), H200, "3.3.1", False),  # before the regression
    ((8, 0), A100, "3.6.0", False),  # not Hopper
    ((10, 0), B200, "3.6.0", False),
    (None, "", "3.6.0", False),  # no CUDA GPU: fla is never called
])
def test_other_stacks_run_fla_backward(capability, name, triton, tilelang):
    assert fla_backward_blocker(capability, name, triton, tilelang) is None


def test_hopper_is_recognised_by_name_or_capability_as_fla_does():
    assert fla_backward_blocker((9, 0), "Some SM90 board", "3.6.0", False) is not None
    assert fla_backward_blocker((8, 9), "NVIDIA H20-like name", "3.6.0", False) is not None  # fla: "NVIDIA H" in name


def test_blocked_packed_rows_take_the_exact_per_sample_torch_path_with_one_warning(caplog):
    model = tiny_model("qwen3_5")
    samples = make_samples(model.config, LENGTHS, image_at=(1,))
    loss_ref, grads_ref = loss_and_grads(model, padded_batch(model, samples))
    make_linear_attention_packable(model, fla_blocker=REASON)
    layers = [m for _, m in linear_attention_modules(model)]
    h = torch.zeros(1, 4, model.config.text_config.hidden_size)
    assert {m.packed_path(h) for m in layers} == {"per_sample_torch"}

    with caplog.at_level(logging.WARNING, logger=linear_attention.__name__):
        loss, grads = loss_and_grads(model, flattened_batch(model, samples))
        loss_and_grads(model, flattened_batch(model, samples))
    warnings = _ours(caplog)
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert REASON in warnings[0] and "per-sample" in warnings[0] and "slower" in warnings[0]
    assert "Triton to >= 3.7.1" in warnings[0] and "tilelang" in warnings[0]

    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen3_5_moe"])
def test_the_torch_path_uses_transformers_pytorch_functions_not_its_fla_dispatch(model_type):
    """transformers' module-level functions pick fla whenever it imports; the functions under
    them (``__wrapped__``) are the PyTorch ones, from the released modeling module."""
    model = tiny_model(model_type)
    make_linear_attention_packable(model)
    layer = linear_attention_modules(model)[0][1]
    module = importlib.import_module(type(layer).__module__)
    for name in ("torch_chunk_gated_delta_rule", "causal_conv1d_fn"):
        dispatch = getattr(module, name)
        torch_fn = inspect.unwrap(dispatch)
        assert torch_fn is not dispatch and torch_fn.__module__ == module.__name__ and torch_fn.__name__ == name


def test_padded_training_is_refused_at_start_up_with_the_fixes():
    model = tiny_model("qwen3_5")
    make_linear_attention_packable(model, fla_blocker=REASON)
    with pytest.raises(FlaCannotTrain) as err:
        check_linear_attention_trainable(model, flattened=False, blocker=REASON)
    assert isinstance(err.value, ConfigError)  # train() prints it and exits with status 2
    message = str(err.value)
    for fix in (REASON, "Triton to >= 3.7.1", "tilelang", "uninstall flash-linear-attention", "--data_flatten True"):
        assert fix in message


def test_flattened_training_is_allowed_and_warned_once_at_start_up(caplog):
    model = tiny_model("qwen3_5")
    make_linear_attention_packable(model, fla_blocker=REASON)
    with caplog.at_level(logging.WARNING, logger=linear_attention.__name__):
        check_linear_attention_trainable(model, flattened=True, blocker=REASON)
        model(**flattened_batch(model, make_samples(model.config, (10, 12)))).loss.backward()
    assert [m.startswith(REASON) for m in _ours(caplog)] == [True]


def test_nothing_is_refused_where_fla_can_train_or_nothing_calls_it(caplog):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    model = tiny_model("qwen3_5")
    make_linear_attention_packable(model, fla_blocker=None)
    with caplog.at_level(logging.WARNING, logger=linear_attention.__name__):
        check_linear_attention_trainable(model, flattened=False, blocker=None)
        config = Qwen3VLConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                head_dim=16, rope_parameters={"rope_type": "default",
                                                                              "mrope_section": [2, 1, 1],
                                                                              "mrope_interleaved": True}),
                               vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=1,
                                                  out_hidden_size=32, deepstack_visual_indexes=[]))
        check_linear_attention_trainable(Qwen3VLForConditionalGeneration(config), flattened=False, blocker=REASON,
                                         fla_missing=True)
    assert not _ours(caplog)


@pytest.mark.parametrize("flattened", [False, True], ids=["padded", "flattened"])
def test_a_gpu_without_fla_is_told_the_slow_path_and_the_install_command(caplog, flattened):
    """On a CUDA machine without flash-linear-attention both layouts train correctly but on the slow
    path; the start-up says so once, with the command that installs the kernels."""
    model = tiny_model("qwen3_5")
    make_linear_attention_packable(model, fla_blocker=None)
    with caplog.at_level(logging.WARNING, logger=linear_attention.__name__):
        check_linear_attention_trainable(model, flattened=flattened, blocker=None, fla_missing=True)
        check_linear_attention_trainable(model, flattened=flattened, blocker=None, fla_missing=False)
    messages = _ours(caplog)
    assert len(messages) == 1
    assert "flash-linear-attention is not installed" in messages[0]
    assert "pip install flash-linear-attention" in messages[0] and "Triton >= 3.7.1" in messages[0]
