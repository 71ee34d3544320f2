"""Chunked linear cross-entropy equals F.cross_entropy on full logits, without making them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from qwenvl.train.loss import causal_lm_loss, chunked_linear_cross_entropy, fused_linear_cross_entropy

N, H, V = 37, 16, 101


def _inputs(dtype, ignored=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[list(ignored)] = -100
    return hidden, weight, labels


def _reference(hidden, weight, labels, reduction):
    """Plain full-logits cross-entropy in fp32 on the same (possibly bf16) values."""
    h = hidden.detach().float().requires_grad_()
    w = weight.detach().float().requires_grad_()
    loss = F.cross_entropy(h @ w.T, labels, ignore_index=-100, reduction=reduction)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _ours(hidden, weight, labels, reduction, chunk_size, scale=1.0):
    loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size, reduction=reduction)
    (loss * scale).backward()
    return loss.detach(), hidden.grad.float(), weight.grad.float()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk_size", [1, 8, 37, 1000])
def test_loss_and_grads_equal_full_cross_entropy(dtype, tol, reduction, chunk_size):
    hidden, weight, labels = _inputs(dtype, ignored=(0, 5, 6, 30))
    loss, gh, gw = _ours(hidden, weight, labels, reduction, chunk_size)
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, labels, reduction)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    for got, want in ((gh, ref_gh), (gw, ref_gw)):
        assert ((got - want).norm() / want.norm()) < tol
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype


def test_ignored_rows_get_no_gradient_and_an_all_ignored_chunk_is_fine():
    ignored = tuple(range(8, 16))  # exactly the second chunk of 8
    hidden, weight, labels = _inputs(torch.float32, ignored=ignored)
    loss, gh, gw = _ours(hidden, weight, labels, "mean", chunk_size=8)
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, labels, "mean")
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(gh, ref_gh)
    torch.testing.assert_close(gw, ref_gw)
    assert not gh[8:16].any()


def test_everything_ignored_gives_zero_not_nan():
    hidden, weight, labels = _inputs(torch.float32, ignored=range(N))
    for reduction in ("sum", "mean"):
        hidden.grad = weight.grad = None
        loss, gh, gw = _ours(hidden, weight, labels, reduction, chunk_size=8)
        assert loss.item() == 0.0 and not gh.any() and not gw.any()


def test_backward_scales_the_stored_gradients():
    hidden, weight, labels = _inputs(torch.float32)
    _, gh, gw = _ours(hidden, weight, labels, "sum", chunk_size=8, scale=0.25)
    _, ref_gh, ref_gw = _reference(hidden, weight, labels, "sum")
    torch.testing.assert_close(gh, ref_gh * 0.25)
    torch.testing.assert_close(gw, ref_gw * 0.25)


def test_frozen_head_and_no_grad():
    hidden, weight, labels = _inputs(torch.float32)
    weight.requires_grad_(False)
    loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=8)
    loss.backward()
    assert weight.grad is None
    torch.testing.assert_close(hidden.grad, _reference(hidden, weight, labels, "sum")[1])
    with torch.no_grad():
        assert chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=8).grad_fn is None


def test_a_second_backward_is_refused():
    hidden, weight, labels = _inputs(torch.float32)
    loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_makes_the_full_logits():
    hidden, weight, labels = _inputs(torch.float32)
    with _LargestTensor() as plain:
        F.cross_entropy(hidden @ weight.T, labels).backward()
    assert plain.largest >= N * V  # the probe sees the full logits when they exist
    hidden.grad = weight.grad = None
    with _LargestTensor() as chunked:
        chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=8).backward()
    assert chunked.largest <= max(8 * V, V * H, N * H), chunked.largest


def test_fused_falls_back_to_chunked_on_cpu():
    hidden, weight, labels = _inputs(torch.float32)
    loss = fused_linear_cross_entropy(hidden, weight, labels, reduction="mean", chunk_size=8)
    torch.testing.assert_close(loss, _reference(hidden, weight, labels, "mean")[0])


def test_argument_checks():
    hidden, weight, labels = _inputs(torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        chunked_linear_cross_entropy(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="bfloat16"):
        chunked_linear_cross_entropy(hidden, weight.detach().bfloat16(), labels)
    with pytest.raises(ValueError, match="expected hidden"):
        chunked_linear_cross_entropy(hidden[None], weight, labels)


def _shifted_reference(hidden_states, weight, labels):
    logits = hidden_states[:, :-1].float() @ weight.float().T
    return F.cross_entropy(logits.reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


def test_causal_lm_loss_shifts_and_normalises():
    g = torch.Generator().manual_seed(1)
    hidden_states = torch.randn(2, 9, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (2, 9), generator=g)
    labels[0, :4] = -100
    labels[1, 7:] = -100
    trained = int((labels[:, 1:] != -100).sum())
    total = _shifted_reference(hidden_states, weight, labels)

    loss = causal_lm_loss(hidden_states, weight, labels, chunk_size=5)
    torch.testing.assert_close(loss, total / trained)
    # The Trainer's count over the whole accumulated batch wins, int or tensor.
    torch.testing.assert_close(causal_lm_loss(hidden_states, weight, labels, num_items_in_batch=40), total / 40)
    torch.testing.assert_close(causal_lm_loss(hidden_states, weight, labels, num_items_in_batch=torch.tensor(40)),
                               total / 40)

    loss.backward()
    ref_h = hidden_states.detach().clone().requires_grad_()
    ref_w = weight.detach().clone().requires_grad_()
    (_shifted_reference(ref_h, ref_w, labels) / trained).backward()
    torch.testing.assert_close(hidden_states.grad, ref_h.grad)
    torch.testing.assert_close(weight.grad, ref_w.grad)
    assert not hidden_states.grad[:, -1].any()  # the last position predicts nothing


def test_causal_lm_loss_equals_the_models_own_loss(tiny_model_dir):
    """On a tiny Qwen2.5-VL: the model's loss from its own lm_head and our loss on its hidden states."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("qwen2_5_vl"), dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(input_ids=ids, labels=labels, output_hidden_states=True)
    ours = causal_lm_loss(out.hidden_states[-1], model.lm_head.weight, labels)
    torch.testing.assert_close(ours, out.loss, rtol=1e-5, atol=1e-5)
