"""Cross-entropy of a linear head without the full (N, V) logits.

With Qwen's 152k-token vocabulary, 16k trained positions make 2.4G logits: 5 GB in bf16,
and F.cross_entropy upcasts them to fp32 and keeps a gradient of the same size.  Here
rows are processed ``chunk_size`` at a time, and each chunk's gradients with respect to
the hidden states and the head's weight are computed right away in the forward pass, so
only one chunk of logits ever exists; backward just scales the stored gradients by the
incoming gradient (torchtune, Liger and Apple's cut-cross-entropy make the same trade).

For bf16/fp16 inputs the matmuls run in the input dtype (the GPU accumulates in fp32
inside them) while the softmax, the loss and the weight gradient summed over chunks are
fp32.
"""
from __future__ import annotations

import importlib.util

import torch

from qwenvl.data.render import IGNORE_INDEX

# Rows per chunk by default: about 2**27 fp32 logits (512 MiB) per chunk; for Qwen's
# vocabulary that is ~880 rows.
DEFAULT_CHUNK_ELEMENTS = 2**27


def default_chunk_size(vocab_size: int) -> int:
    return max(1, DEFAULT_CHUNK_ELEMENTS // vocab_size)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """loss = reduce_i CE(hidden_i @ weight.T, label_i); gradients made during forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int, ignore_index: int, reduction: str,
                want_grads: bool, accum_dtype: torch.dtype):
        n = hidden.shape[0]
        valid = labels != ignore_index
        # The mean divides by the number of trained rows, known before the loop; none at all
        # gives 0 (not F.cross_entropy's nan), so an all-prompt micro-batch adds nothing.
        denominator = valid.sum().clamp_min(1).to(torch.float32) if reduction == "mean" else None
        grad_hidden = torch.empty_like(hidden) if (want_grads and ctx.needs_input_grad[0]) else None
        grad_weight = (torch.zeros(weight.shape, dtype=accum_dtype, device=weight.device)
                       if (want_grads and ctx.needs_input_grad[1]) else None)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)

        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            h = hidden[start:stop]
            keep = valid[start:stop]
            target = torch.where(keep, labels[start:stop], 0)
            logits = (h @ weight.T).float()  # (C, V): the only logits that exist at once
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            total += torch.where(keep, lse - picked, 0.0).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d loss / d logits = softmax - one_hot, zero on ignored rows; built in place.
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits.scatter_add_(1, target[:, None], torch.full_like(picked[:, None], -1.0))
            grad_logits.mul_(keep[:, None])
            if denominator is not None:
                grad_logits.div_(denominator)
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                torch.matmul(grad_logits, weight, out=grad_hidden[start:stop])
            if grad_weight is not None:
                grad_weight.add_((grad_logits.T @ h).to(accum_dtype))

        if denominator is not None:
            total = total / denominator
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.used = False
        return total

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.used:
            # The stored gradients are scaled in place; a second backward would scale them twice.
            raise RuntimeError("chunked_linear_cross_entropy supports one backward pass per forward")
        ctx.used = True
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 chunk_size: int | None = None, ignore_index: int = IGNORE_INDEX,
                                 reduction: str = "sum", accum_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, labels, reduction=...)`` in chunks of rows.

    hidden (N, H), weight (V, H), labels (N,) with ``ignore_index`` for untrained rows.
    Returns an fp32 scalar.  ``reduction="mean"`` averages over trained rows (0 when none).
    The weight gradient is summed over chunks in ``accum_dtype`` (an fp32 copy of the head:
    2.2 GB for 152k x 3584; pass the weight's dtype to save it at some precision).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', not {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden (N, H), weight (V, H), labels (N,); got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(labels.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}: cast one (under autocast, "
                         f"cast both to the autocast dtype first)")
    chunk_size = chunk_size or default_chunk_size(weight.shape[0])
    want_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, int(chunk_size), ignore_index, reduction,
                                            want_grads, accum_dtype)


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = IGNORE_INDEX, reduction: str = "sum",
                               chunk_size: int | None = None) -> torch.Tensor:
    """Liger's fused Triton kernel on CUDA when liger-kernel is installed, else the chunked one."""
    if hidden.is_cuda and liger_available():
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction=reduction)(weight, hidden, labels)
        # Some releases return (loss, z_loss) or an output object.
        if isinstance(loss, (tuple, list)):
            loss = loss[0]
        return getattr(loss, "loss", loss)
    return chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size,
                                        ignore_index=ignore_index, reduction=reduction)


def causal_lm_loss(hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch: int | torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                   chunk_size: int | None = None) -> torch.Tensor:
    """Next-token loss: position t predicts labels[t + 1].

    hidden_states (B, L, H) from the final norm, labels (B, L).  Summed, then divided by
    ``num_items_in_batch`` when given (the Trainer's count of trained tokens over the
    whole accumulated batch: each backward sums gradients, so normalising by the
    micro-batch's own count would weight small micro-batches up), else by the number of
    trained tokens here.  In a flattened batch the last token of one sample "predicts"
    the first token of the next; that label is a prompt token (-100), so nothing leaks.
    """
    b, length, h = hidden_states.shape
    # Shift the labels (not the hidden states): padding one -100 per row keeps the hidden
    # states a free reshape instead of a copy of (B, L-1, H).
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index).to(hidden_states.device)
    total = fused_linear_cross_entropy(hidden_states.reshape(b * length, h), lm_head_weight, shifted.reshape(-1),
                                       ignore_index=ignore_index, reduction="sum", chunk_size=chunk_size)
    if num_items_in_batch is None:
        denominator = (shifted != ignore_index).sum().clamp_min(1)
    else:
        denominator = num_items_in_batch
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device, torch.float32)
    return total / denominator
