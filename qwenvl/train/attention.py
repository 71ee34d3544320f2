"""Packed attention on PyTorch's own FlashAttention kernel (``torch.nn.attention.varlen``).

One attention function serves both halves of a Qwen-VL model:

* the language model, whose flattened batch is one row of several samples: the
  boundaries come from the text position ids (row 0 of the 4-row position ids the
  flattened collator writes), which restart at 0 for every sample;
* the vision tower, which hands over ``cu_seq_lens_q/k`` for its images or windows.

How transformers (5.17 to 5.23) drives it, and why the name contains "flash":

* ``is_flash_attention_requested`` is ``"flash" in name``.  For such names the Qwen
  vision towers pass ``cu_seqlens`` and ``max_seqlen`` to the attention function in one
  call; for any other name they split the windows on the host and call attention once
  per window (thousands of tiny calls per step).
* The language model passes ``position_ids`` (text positions) and the mask built by the
  mask function registered under the same name in ``AttentionMaskInterface``.  Ours
  returns only the 2D padding mask (or None), like FlashAttention's; without a
  registration transformers returns no mask at all, and a padded batch would be wrong.
* ``from_pretrained(attn_implementation=NAME)`` and ``set_attn_implementation(NAME)``
  refuse every "flash" name that is not a FlashAttention package or a Hub kernel: they
  try to import it (``lazy_import_flash_attention``) and raise "Could not find the
  currently requested flash attention implementation".  So load with
  ``loadable_attn_implementation(name)`` ("sdpa") and switch afterwards with
  ``apply_attn_implementation(model, name)``, which sets the configs' attention field
  (its own setter recurses into the sub-configs) without that import.

The kernel's signature changed between releases; ``VarlenKernel.from_function`` reads
it with ``inspect``: torch 2.10 takes ``is_causal`` and no ``scale``; 2.11 takes
``window_size=(-1, 0)`` for causal and a ``scale``; 2.14 adds ``enable_gqa``.  What a
release lacks is done around the call (query pre-scaled, key/value heads repeated).
The kernel is CUDA-only (half precision, sm80+): numerics are tested on a GPU, the
plumbing on CPU with a reference kernel of the same signature.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from qwenvl.hf_internals import attn_implementation, set_attn_implementation_field

logger = logging.getLogger(__name__)

VARLEN_ATTENTION = "flash_varlen_torch"

_HALF = (torch.float16, torch.bfloat16)


# -- the kernel ----------------------------------------------------------------------
@dataclass(frozen=True)
class VarlenKernel:
    """A ``varlen_attn``-like function and the spelling of its options.

    ``fn(q (T, Hq, D), k (T, Hkv, D), v, cu_q, cu_k, max_q, max_k, ...) -> (T, Hq, D)``.
    """

    fn: Callable
    causal_style: str  # "is_causal" (torch 2.10) or "window_size" (2.11+)
    has_scale: bool
    has_gqa: bool
    needs_half: bool = True  # FlashAttention takes fp16/bf16 only

    @classmethod
    def from_function(cls, fn: Callable, needs_half: bool = True) -> "VarlenKernel":
        params = inspect.signature(fn).parameters
        if "window_size" in params:
            style = "window_size"
        elif "is_causal" in params:
            style = "is_causal"
        else:
            raise TypeError(f"{fn!r} takes neither window_size nor is_causal: not a varlen_attn signature I know")
        return cls(fn, style, "scale" in params, "enable_gqa" in params, needs_half)

    def __call__(self, q, k, v, cu_q, cu_k, max_q: int, max_k: int, *, causal: bool,
                 scale: float | None, left_window: int | None = None) -> torch.Tensor:
        kwargs = {}
        if scale is not None:
            if self.has_scale:
                kwargs["scale"] = scale
            elif not math.isclose(scale, q.shape[-1] ** -0.5):
                # The kernel applies 1/sqrt(D); fold the rest into the query.
                q = q * (scale * math.sqrt(q.shape[-1]))
        if k.shape[1] != q.shape[1]:
            if self.has_gqa:
                kwargs["enable_gqa"] = True
            else:
                k, v = repeat_kv_heads(k, q.shape[1]), repeat_kv_heads(v, q.shape[1])
        if self.causal_style == "window_size":
            left = -1 if left_window is None else left_window
            # A tuple: torch 2.11 detects causal with ``window_size == (-1, 0)``.
            kwargs["window_size"] = (left, 0) if causal else (left, -1)
        else:
            if left_window is not None:
                raise NotImplementedError("sliding-window attention needs torch >= 2.11 (varlen_attn window_size)")
            kwargs["is_causal"] = causal
        out = self.fn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def repeat_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(T, Hkv, D) -> (T, num_heads, D), each key/value head repeated for its query group
    (the grouping of transformers' ``repeat_kv``: query head h uses kv head h // group)."""
    t, hkv, d = x.shape
    if num_heads % hkv:
        raise ValueError(f"{num_heads} query heads cannot share {hkv} key/value heads")
    return x[:, :, None, :].expand(t, hkv, num_heads // hkv, d).reshape(t, num_heads, d)


_TORCH_KERNEL: list = []  # memo: [] unresolved, [None] absent, [VarlenKernel] present


def torch_varlen_kernel() -> VarlenKernel | None:
    """PyTorch's ``varlen_attn`` wrapped with its detected signature, or None (torch < 2.10)."""
    if not _TORCH_KERNEL:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _TORCH_KERNEL.append(None)
        else:
            _TORCH_KERNEL.append(VarlenKernel.from_function(varlen_attn))
    return _TORCH_KERNEL[0]


def varlen_available() -> bool:
    """Whether this torch ships ``varlen_attn`` (it still needs a CUDA GPU of sm80 or newer)."""
    return torch_varlen_kernel() is not None


# -- sequence boundaries ---------------------------------------------------------------
@dataclass
class PackedLayout:
    """Where each sequence starts in the flattened (B * L) tokens, as the kernel wants it.

    ``q_index`` / ``k_index`` list the real (non-padding) tokens when the batch is padded;
    None means every token takes part.
    """

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    q_index: torch.Tensor | None = None
    k_index: torch.Tensor | None = None


def _as_cu(cu: torch.Tensor, device) -> torch.Tensor:
    return cu.to(device=device, dtype=torch.int32)


def _max_len(cu: torch.Tensor, given) -> int:
    if given is None:
        return int((cu[1:] - cu[:-1]).max())
    if isinstance(given, torch.Tensor):  # a 0-dim tensor from transformers
        return int(given)
    # An int, or inside a compiled layer a symbolic int: int() would specialise the graph on
    # this batch's longest sequence and recompile for the next one.
    return given


def layout_from_cu_seqlens(cu_q, cu_k, max_q, max_k, device) -> PackedLayout:
    """Boundaries handed over by the caller (the vision tower, or a collator's kwargs)."""
    cu_k = cu_q if cu_k is None else cu_k
    max_q = _max_len(cu_q, max_q)
    max_k = max_q if (max_k is None and cu_k is cu_q) else _max_len(cu_k, max_k)
    return PackedLayout(_as_cu(cu_q, device), _as_cu(cu_k, device), max_q, max_k)


def layout_full_rows(batch: int, q_len: int, k_len: int, device) -> PackedLayout:
    """Each row one sequence; no device sync.  With q_len < k_len (decoding from a cache)
    the kernel aligns the causal mask bottom-right, so the queries are the row's last tokens."""
    rows = torch.arange(batch + 1, device=device, dtype=torch.int32)
    return PackedLayout(rows * q_len, rows * k_len, q_len, k_len)


def layout_from_padding_mask(mask: torch.Tensor, q_len: int) -> PackedLayout:
    """A (B, K) padding mask (True = real token): real tokens only, one sequence per row."""
    mask = mask.bool()
    k_counts = mask.sum(-1, dtype=torch.int32)
    k_index = mask.flatten().nonzero().flatten()
    cu_k = torch.nn.functional.pad(k_counts.cumsum(0, dtype=torch.int32), (1, 0))
    if q_len == mask.shape[1]:
        q_index, cu_q, max_q = k_index, cu_k, None
    else:
        q_mask = mask[:, -q_len:]
        q_index = q_mask.flatten().nonzero().flatten()
        cu_q = torch.nn.functional.pad(q_mask.sum(-1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
        max_q = None
    max_k = int(k_counts.max())
    max_q = max_k if max_q is None else int((cu_q[1:] - cu_q[:-1]).max())
    return PackedLayout(cu_q, cu_k, max_q, max_k, q_index, k_index)


def layout_from_position_ids(position_ids: torch.Tensor) -> PackedLayout:
    """(B, L) text positions -> one sequence per run of consecutive positions.

    A new sequence starts at every row start and wherever a position is not its
    predecessor + 1: the rule transformers uses for the SDPA/eager block-diagonal mask
    (``find_packed_sequence_indices``), so both paths isolate the same samples.
    """
    batch, length = position_ids.shape
    step = torch.diff(position_ids, dim=-1) != 1
    starts = torch.nn.functional.pad(step, (1, 0), value=True).flatten()
    cu = torch.cat([starts.nonzero().flatten(), starts.new_tensor([batch * length], dtype=torch.long)])
    cu = cu.to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedLayout(cu, cu, max_len, max_len)


class _PositionLayoutCache:
    """Every layer of one forward gets the same text-position tensor; derive its
    boundaries once instead of once per layer (each derivation syncs the device).

    The fallback for forwards the language model's pre-hook (``_boundaries_pre_hook``)
    leaves alone: a prefill that already carries a KV cache object (generation), or a
    model whose attention was switched without ``apply_attn_implementation``.

    Keyed on the tensor object itself (held, so its memory cannot be reused by another
    tensor while cached) and its in-place version counter.
    """

    def __init__(self):
        self._tensor = None
        self._version = None
        self._layout = None

    def get(self, position_ids: torch.Tensor, batch: int) -> PackedLayout:
        def derive():
            # Positions are sometimes (1, L) for a batch of B rows: the same for every row.
            return layout_from_position_ids(position_ids.expand(batch, -1))

        if torch.compiler.is_compiling():  # no identity cache inside a traced graph
            return derive()
        key = (position_ids._version, batch)
        if self._tensor is not position_ids or self._version != key:
            self._layout = derive()
            self._tensor, self._version = position_ids, key
        return self._layout


_POSITION_LAYOUTS = _PositionLayoutCache()


def _choose_layout(query, key, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k,
                   max_length_q, max_length_k) -> PackedLayout:
    batch, _, q_len, _ = query.shape
    k_len = key.shape[2]
    if cu_seq_lens_q is not None:
        return layout_from_cu_seqlens(cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, query.device)
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                f"{VARLEN_ATTENTION} takes a 2D padding mask, got shape {tuple(attention_mask.shape)}: the model "
                f"built its mask with another mask function. Switch with apply_attn_implementation(), which "
                f"registers the matching one.")
        return layout_from_padding_mask(attention_mask, q_len)
    if position_ids is not None and q_len == k_len:
        return _POSITION_LAYOUTS.get(position_ids, batch)
    return layout_full_rows(batch, q_len, k_len, query.device)


# -- the attention function ------------------------------------------------------------
_warned_fp32 = []


def _half_dtype(device_type: str) -> torch.dtype:
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        if dtype in _HALF:
            return dtype
    return torch.bfloat16


def make_attention_forward(kernel: VarlenKernel | Callable[[], VarlenKernel | None]) -> Callable:
    """An ``AttentionInterface`` function running ``kernel`` (or a zero-argument callable
    that returns it, resolved at the first call so importing this module never needs CUDA)."""

    def resolve() -> VarlenKernel:
        found = kernel if isinstance(kernel, VarlenKernel) else kernel()
        if found is None:
            raise RuntimeError(f"{VARLEN_ATTENTION} needs torch.nn.attention.varlen (torch >= 2.10); "
                               f"torch {torch.__version__} lacks it. Use sdpa or flash_attention_2.")
        return found

    def varlen_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,  # (B, Hq, Lq, D)
        key: torch.Tensor,  # (B, Hkv, Lk, D)
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
        is_causal: bool | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q=None,
        max_length_k=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """Returns ((B, Lq, Hq, D), None), the layout of transformers' other attention functions."""
        run = resolve()
        if dropout:
            raise ValueError(f"{VARLEN_ATTENTION} has no attention dropout (got {dropout}); the Qwen-VL configs "
                             f"use 0. Set attention_dropout=0 or use sdpa.")
        if softcap is not None or kwargs.get("s_aux") is not None:
            raise NotImplementedError(f"{VARLEN_ATTENTION} supports neither logit softcapping nor attention sinks")
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        # transformers' sliding window keeps the last `sliding_window` keys, the query's own included.
        left_window = sliding_window - 1 if sliding_window else None

        batch, heads, q_len, head_dim = query.shape
        layout = _choose_layout(query, key, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k,
                                max_length_q, max_length_k)
        # (B, H, L, D) -> (B * L, H, D): the kernel's packed layout.
        q = query.transpose(1, 2).reshape(-1, heads, head_dim)
        k = key.transpose(1, 2).reshape(-1, key.shape[1], head_dim)
        v = value.transpose(1, 2).reshape(-1, value.shape[1], value.shape[-1])
        if layout.q_index is not None:
            q = q.index_select(0, layout.q_index)
        if layout.k_index is not None:
            k, v = k.index_select(0, layout.k_index), v.index_select(0, layout.k_index)

        in_dtype = q.dtype
        if run.needs_half and in_dtype not in _HALF:
            # Happens when PEFT or a caller upcasts activations; FlashAttention has no fp32 kernel.
            half = _half_dtype(q.device.type)
            # (No logging while a compiled layer is traced: it would break the graph.)
            if not _warned_fp32 and not torch.compiler.is_compiling():
                logger.warning("%s: casting %s query/key/value to %s for the FlashAttention kernel",
                               VARLEN_ATTENTION, in_dtype, half)
                _warned_fp32.append(True)
            q, k, v = q.to(half), k.to(half), v.to(half)

        out = run(q, k, v, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k,
                  causal=causal, scale=scaling, left_window=left_window).to(in_dtype)
        if layout.q_index is not None:  # padding rows come back as zeros
            full = out.new_zeros(batch * q_len, heads, out.shape[-1])
            out = full.index_copy(0, layout.q_index, out)
        return out.view(batch, q_len, heads, out.shape[-1]), None

    return varlen_attention_forward


def padding_mask_only(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                      mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """``AttentionMaskInterface`` function: the (B, K) padding mask, or None when nothing is padded.

    The varlen kernel applies causality and packed-sample boundaries itself, so the 4D
    mask SDPA needs is never built (at 16k tokens it would be 256M entries per row).
    """
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


# -- registration and selection -------------------------------------------------------------
_REGISTERED: dict[str, Callable] = {}


def register_attention(name: str = VARLEN_ATTENTION, kernel: VarlenKernel | None = None) -> str:
    """Register the attention and mask functions under ``name`` (idempotent); returns ``name``.

    ``kernel`` replaces PyTorch's (tests use a CPU reference of the same signature).
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    if kernel is None:
        # Build PyTorch's kernel object now (an import and a signature read; no GPU needed). Left to the first
        # attention call, that is inside a compiled layer's trace: dynamo then records the new object's
        # attributes as pending side effects, and calling it raised "InternalTorchDynamoError: 'VarlenKernel'
        # object has no attribute 'fn'" (torch 2.11, H200, --attn_implementation flash_varlen_torch with
        # --compile_layers, nothing else having asked for the kernel before the first step).
        torch_varlen_kernel()
    if name not in _REGISTERED or kernel is not None:
        _REGISTERED[name] = make_attention_forward(kernel if kernel is not None else torch_varlen_kernel)
    AttentionInterface.register(name, _REGISTERED[name])
    AttentionMaskInterface.register(name, padding_mask_only)
    return name


def flash_attn_importable() -> bool:
    """Whether the flash-attn package (FlashAttention 2) is installed."""
    return importlib.util.find_spec("flash_attn") is not None


def choose_attn_implementation(requested: str | None, device_is_cuda: bool) -> str:
    """The attention implementation to train with.

    ``requested`` when given; else flash_attention_2 where flash-attn is installed and the
    model is on CUDA; else PyTorch's varlen kernel on CUDA (torch >= 2.10, sm80+); else sdpa.
    """
    if requested:
        if requested in _REGISTERED or requested == VARLEN_ATTENTION:
            register_attention(requested)
        return requested
    if device_is_cuda and flash_attn_importable():
        return "flash_attention_2"
    if device_is_cuda and varlen_available() and _cuda_supports_flash():
        return register_attention()
    return "sdpa"


def _cuda_supports_flash() -> bool:
    # FlashAttention 2 needs Ampere (sm80) or newer; no GPU to ask means trust the caller.
    if not torch.cuda.is_available():
        return True
    return torch.cuda.get_device_capability() >= (8, 0)


def is_ours(name: str | None) -> bool:
    """Whether ``name`` is an attention registered by this module."""
    return name is not None and (name in _REGISTERED or name == VARLEN_ATTENTION)


def loadable_attn_implementation(name: str | None) -> str | None:
    """What to pass to ``from_pretrained``: transformers refuses our "flash" names at load
    time (see the module docstring), so load with sdpa and switch with ``apply_attn_implementation``."""
    return "sdpa" if is_ours(name) else name


def apply_attn_implementation(model: torch.nn.Module, name: str) -> None:
    """Make ``model`` (and its vision tower and language model) use attention ``name``.

    For our names, the configs' ``_attn_implementation`` is set directly: the property's
    setter recurses into the sub-configs, and every module that keeps a config (the
    attention layers read ``self.config._attn_implementation`` at each call) is visited
    in case it holds a copy.  Other names go through ``model.set_attn_implementation``.
    """
    if not is_ours(name):
        if attn_implementation(model.config) != name:
            model.set_attn_implementation(name)
        return
    from transformers import PreTrainedConfig

    register_attention(name)
    seen = set()
    for module in [model, *model.modules()]:
        config = getattr(module, "config", None)
        if isinstance(config, PreTrainedConfig) and id(config) not in seen:
            seen.add(id(config))
            set_attn_implementation_field(config, name)
    supply_packed_boundaries(model)


# -- packed-sequence boundaries, once per forward ------------------------------------------
_HOOK_ATTR = "_qwenvl_packed_boundaries_hook"


def language_models(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The text decoders inside ``model`` (``...language_model``), however it is wrapped."""
    import re

    return [m for n, m in model.named_modules() if re.search(r"(^|\.)language_model$", n) and hasattr(m, "layers")]


def _boundaries_pre_hook(module, args, kwargs):
    """Forward pre-hook of a language model: hand its layers the packed-sequence boundaries.

    A flattened batch reaches the language model as one row of several samples, with
    4-row position ids whose text row restarts at 0 for every sample and no attention
    mask.  The boundaries are derived here, once per forward and outside any compiled
    layer, and passed down as transformers' own FlashAttention kwargs (``cu_seq_lens_q/k``,
    ``max_length_q/k``), which the text models forward to every layer's attention.  The
    vision tower never sees them (it is called separately with its own ``cu_seqlens``).
    Inside a compiled layer (``--compile_layers``) the attention is then fully traceable:
    no data-dependent ``nonzero`` and no host-side ``max`` breaks the graph.

    Models with linear-attention layers (Qwen3.5's Gated DeltaNet) need the boundaries
    whatever the attention kernel (``linear_attention.py``), so the hook runs for them too.
    """
    if not (is_ours(attn_implementation(module.config)) or carries_state(module.config)):
        return None
    if kwargs.get("attention_mask") is not None or kwargs.get("cu_seq_lens_q") is not None:
        return None  # padded rows go through the mask path; explicit boundaries win
    if kwargs.get("past_key_values") is not None:
        return None  # decoding from a cache: queries and keys differ in length
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        return None
    if position_ids.dim() == 3 and position_ids.shape[0] == 4:
        text = position_ids[0]  # the text row the flattened collator writes first
    elif position_ids.dim() == 2:
        text = position_ids
    else:
        return None  # only the 3 mRoPE rows: no per-sample text positions to split on
    layout = layout_from_position_ids(text)
    kwargs = dict(kwargs, cu_seq_lens_q=layout.cu_q, cu_seq_lens_k=layout.cu_k,
                  max_length_q=layout.max_q, max_length_k=layout.max_k)
    return args, kwargs


def carries_state(config) -> bool:
    """Whether a text config has linear-attention layers (state carried along the sequence)."""
    return "linear_attention" in (getattr(config, "layer_types", None) or ())


def supply_packed_boundaries(model: torch.nn.Module) -> int:
    """Register ``_boundaries_pre_hook`` on every language model of ``model`` (once each);
    returns how many language models carry it.  The hook does nothing unless the model's
    attention is ours or it has linear-attention layers."""
    found = language_models(model)
    for lm in found:
        if getattr(lm, _HOOK_ATTR, None) is None:
            setattr(lm, _HOOK_ATTR, lm.register_forward_pre_hook(_boundaries_pre_hook, with_kwargs=True))
    return len(found)
