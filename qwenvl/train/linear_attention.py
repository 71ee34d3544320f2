"""Packed samples through Gated DeltaNet (linear-attention) layers, with no state crossing a boundary.

Qwen3.5 / Qwen3.6 (``qwen3_5``, ``qwen3_5_moe``) interleave three Gated DeltaNet layers with
one full-attention layer.  A Gated DeltaNet layer carries two things along the sequence: a
causal depthwise convolution over the last ``linear_conv_kernel_dim`` tokens and a recurrent
state.  In a flattened batch (several samples in one row, text positions restarting at 0),
restarting position ids separate samples for the full-attention layers only; the linear-
attention layers need the boundaries themselves.  What transformers (5.17 to 5.23) does with
them (``models/qwen3_5/modeling_qwen3_5.py``, ``Qwen3_5GatedDeltaNet.forward``):

* ``cu_seq_lens_q`` from the layer's kwargs goes to the gated delta rule as ``cu_seqlens``.
  With flash-linear-attention (``fla``) installed that is its chunked kernel, which honours
  it; without, ``integrations/hub_kernels.py`` (``use_kernel_func_from_hub_with_fallback``)
  raises "can't keep packed sequences apart without `flash-linear-attention`".
* The convolution takes boundaries only as ``seq_idx``, and only from the ``causal-conv1d``
  CUDA package; its PyTorch fallback raises when given ``seq_idx`` and otherwise (the usual
  case: ``cu_seq_lens_q`` is not a name it checks) convolves across the boundary, so the
  first three tokens of every packed sample see the previous sample.  With fla installed and
  no causal-conv1d, that is a silent leak.
* transformers never derives the boundaries from position ids.

So the layers are given a boundary-aware training forward here, as a subclass of the
released layer class that keeps its name (``make_linear_attention_packable``; the model's
parameters, state dict and saved checkpoints are unchanged).  It runs only when boundaries
arrive (``cu_seq_lens_q``, supplied once per forward by the language model's pre-hook in
``attention.py`` from the text position row); padded batches, evaluation and generation use
the released forward untouched.  Two ways to compute it:

* ``fla`` (CUDA with flash-linear-attention): one call of fla's Triton causal conv1d and of
  its chunked gated delta rule over the whole row, both with ``cu_seqlens``.
* ``per_sample`` (anywhere; CPU tests): the released forward run on each sample's slice of
  the row, so each sample starts from a zero state and a zero-padded convolution, exactly as
  it would alone.  Correct but one call per sample per layer.

Where fla is installed but its gated delta rule cannot run a backward (Hopper with Triton
3.4.0 to 3.7.0 and no TileLang: ``fla_backward_blocker``), the released forward would reach fla
too (transformers picks fla's function whenever it imports), so packed rows then take
transformers' PyTorch reference functions one sample at a time (exact, slower; one warning),
and padded training is refused at start-up (``check_linear_attention_trainable``).

transformers' other hooks were considered: the hub ``kernels`` package (``KernelConfig``,
``use_kernel_forward_from_hub("Qwen3_5GatedDeltaNet")``) can replace this layer's forward too,
but needs that package, which ``kernelize`` only applies to classes with the decorator (the
MoE variant, ``Qwen3_5MoeGatedDeltaNet``, has none in 5.23), and whose function-level
fallbacks are chosen once at import.  A layer subclass works on both variants, on every
transformers release that has them, with or without extra packages.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os

import torch

from qwenvl.hf_internals import reference_linear_attention_functions

from .arguments import ConfigError

logger = logging.getLogger(__name__)

# The kwargs transformers' varlen attention takes; the linear-attention layers need only the first.
_BOUNDARY_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
BACKENDS = ("auto", "fla", "per_sample")
_FLA_LAYOUT = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "conv1d", "A_log", "dt_bias", "norm", "out_proj")


def linear_attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every linear-attention layer of ``model`` (``...layers.N.linear_attn``)."""
    return [(n, m) for n, m in model.named_modules() if n.endswith("linear_attn") and hasattr(m, "conv1d")]


# -- flash-linear-attention ---------------------------------------------------------------------------
_FLA: list = []  # memo: [] unresolved, [None] absent, [(causal_conv1d, chunk_gated_delta_rule)]


def fla_kernels():
    """fla's ``(causal_conv1d, chunk_gated_delta_rule)``, or None when fla is not installed.

    The convolution moved from ``fla.modules.convolution`` (0.3-0.5) to
    ``fla.modules.causal_conv1d`` (0.6, which keeps the old name as an alias).
    """
    if not _FLA:
        found = None
        if importlib.util.find_spec("fla") is not None:
            try:
                from fla.ops.gated_delta_rule import chunk_gated_delta_rule
                try:
                    from fla.modules.causal_conv1d import causal_conv1d
                except ImportError:
                    from fla.modules.convolution import causal_conv1d
                found = (causal_conv1d, chunk_gated_delta_rule)
            except ImportError:
                found = None
        _FLA.append(found)
    return _FLA[0]


def fla_available() -> bool:
    """Whether flash-linear-attention's kernels import here (they still need a CUDA GPU)."""
    return fla_kernels() is not None


# -- can fla's gated delta rule run a backward here? -------------------------------------------------------
_TRITON_WITH_HOPPER_BUG = ("3.4.0", "3.7.1")  # [first bad, first fixed), compared as fla does (packaging)
FLA_FIXES = ("upgrade Triton to >= 3.7.1, or install tilelang (`pip install tilelang`, with a CUDA toolkit's "
             "nvcc on PATH)")


def fla_backward_blocker(capability: tuple[int, int] | None, device_name: str, triton_version: str,
                         tilelang_usable: bool) -> str | None:
    """Why flash-linear-attention's chunked gated delta rule cannot run a backward on this GPU, or
    None when it can.  ``capability`` is the CUDA compute capability (None: no CUDA GPU).

    fla-core 0.6.0's own condition: ``chunk_bwd_dqkwg`` raises at the first backward
    (``fla/ops/common/chunk_o.py:727``: ``g is not None and IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0
    and not TRITON_ABOVE_3_7_1``; the gated delta rule always passes ``g``), because those Triton
    releases compute that gradient wrongly on Hopper (fla issue #640).  ``IS_NVIDIA_HOPPER``
    (``fla/utils/hardware.py:99``) is a device name containing "NVIDIA H" or capability 9.x; the
    Triton flags are ``fla/utils/env.py:105,108``.  Its TileLang backend takes that kernel over
    when usable (``fla/ops/common/backends/tilelang/__init__.py:17-19``, enabled by default in
    exactly this case; ``fla/backends.py`` ``TileLangBackend``: tilelang importable and an nvcc).
    """
    from packaging.version import Version

    if capability is None:
        return None
    hopper = "NVIDIA H" in device_name or capability[0] == 9
    first_bad, first_fixed = map(Version, _TRITON_WITH_HOPPER_BUG)
    if not hopper or not first_bad <= Version(triton_version) < first_fixed or tilelang_usable:
        return None
    return (f"flash-linear-attention's gated delta rule cannot run a backward on this {device_name} "
            f"(Hopper) with Triton {triton_version} and no usable tilelang: Triton >= 3.4.0 and < 3.7.1 "
            f"computes its gradient wrongly there, so fla raises at the first backward (fla issue #640)")


def fla_rule_importable() -> bool:
    """Whether fla's ``chunk_gated_delta_rule`` imports.  transformers' Qwen3.5 layers then call it
    instead of their PyTorch reference, in every training forward, padded or not: the choice is
    made once, when the modeling module is imported, by ``use_kernel_func_from_hub_with_fallback``
    (``transformers/integrations/hub_kernels.py``, 5.23 lines 990-1020: fla's function whenever
    ``fla.ops.gated_delta_rule`` resolves, else the PyTorch one)."""
    if importlib.util.find_spec("fla") is None:
        return False
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: F401
    except Exception:  # transformers falls back on any import failure too
        return False
    return True


def _fla_tilelang_usable() -> bool:
    """fla's own answer to "will the TileLang backend take the gated backward kernel?"."""
    if os.environ.get("FLA_DISABLE_BACKEND_DISPATCH") == "1":  # fla/backends.py:27: no backend at all
        return False
    try:
        from fla.ops.common.backends.tilelang import CommonTileLangBackend
    except ImportError:  # an fla without that backend: the Triton kernel runs
        return False
    return bool(CommonTileLangBackend.is_available() and CommonTileLangBackend().is_enabled())


@functools.cache
def fla_backward_blocker_here() -> str | None:
    """``fla_backward_blocker`` for this process's GPU, Triton and tilelang; None without a CUDA
    GPU or without fla (then nothing calls fla)."""
    if not torch.cuda.is_available() or not fla_rule_importable():
        return None
    import triton

    index = torch.cuda.current_device()
    return fla_backward_blocker(torch.cuda.get_device_capability(index), torch.cuda.get_device_name(index),
                                triton.__version__, _fla_tilelang_usable())


_WARNED: list = []


def warn_once_fla_backward_blocked(reason: str) -> None:
    """The one warning of a run whose packed rows avoid fla (``fla_backward_blocker``)."""
    if not _WARNED:
        _WARNED.append(reason)
        logger.warning("%s. Packed samples go through the exact per-sample PyTorch path instead, which is much "
                       "slower; for fla's kernels %s.", reason, FLA_FIXES)


def reference_varlen_kernels(layer) -> tuple:
    """transformers' own PyTorch convolution and gated delta rule for ``layer``'s model, behind fla's
    varlen signatures, one sample at a time (exact; no fla, so no fla backward)."""
    module = importlib.import_module(type(layer).__module__)  # the released modeling module
    # The PyTorch functions under the fla / causal-conv1d dispatch (through ``__wrapped__``).
    conv_fn, rule_fn = reference_linear_attention_functions(module)

    def conv(x, weight=None, bias=None, activation=None, cu_seqlens=None, **_):
        bounds = cu_seqlens.tolist()
        pieces = [conv_fn(x[:, a:b].transpose(1, 2), weight, bias, activation=activation).transpose(1, 2)
                  for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        return torch.cat(pieces, 1), None

    def rule(q, k, v, g=None, beta=None, cu_seqlens=None, use_qk_l2norm_in_kernel=False, **_):
        bounds = cu_seqlens.tolist()
        pieces = [rule_fn(q[:, a:b], k[:, a:b], v[:, a:b], g=g[:, a:b], beta=beta[:, a:b],
                          use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)[0]
                  for a, b in zip(bounds[:-1], bounds[1:]) if b > a]  # as _per_sample_forward: skip empty
        return torch.cat(pieces, 1), None

    return conv, rule


_LONG_CU: list = [None, None]  # [the boundaries tensor last converted, its int64 copy]


def _long_boundaries(cu: torch.Tensor, device) -> torch.Tensor:
    """``cu`` as int64 on ``device``, the same tensor object for every layer of one forward: fla
    caches what it derives from the boundaries (chunk indices) by tensor identity."""
    if cu.dtype == torch.long and cu.device == device:
        return cu
    if _LONG_CU[0] is not cu or torch.compiler.is_compiling():
        _LONG_CU[:] = [cu, cu.to(device=device, dtype=torch.long)]
    return _LONG_CU[1]


# -- the boundary-aware layer ---------------------------------------------------------------------------
class PackedLinearAttention:
    """Mixin over a released ``*GatedDeltaNet`` class: a forward that honours ``cu_seq_lens_q``.

    ``boundary_backend``: "auto" (fla on CUDA when installed, else per sample), "fla" or
    "per_sample" (tests force it to compare the two).
    """

    boundary_backend: str = "auto"
    # (causal_conv1d, chunk_gated_delta_rule) with fla's signatures; None: fla's own.  Tests pass
    # reference kernels here to check this forward's plumbing where fla cannot run (CPU).
    varlen_kernels: tuple | None = None
    # Set at start-up (make_linear_attention_packable): fla_backward_blocker's reason, or None.
    fla_backward_blocker: str | None = None

    def forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None or cache_params is not None:
            # Padded rows, evaluation, generation: the released forward.
            return super().forward(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)
        if attention_mask is not None:
            raise ValueError("a linear-attention layer got both a padding mask and packed-sequence boundaries; "
                             "a flattened batch has no padding mask")
        kwargs = {k: v for k, v in kwargs.items() if k not in _BOUNDARY_KWARGS}
        return self._packed_forward(hidden_states, cu, kwargs)

    # Inside a compiled layer (--compile_layers) this part runs eagerly, like our varlen attention:
    # the per-sample path slices on host-side boundaries and fla's kernels are Triton already.
    @torch.compiler.disable
    def _packed_forward(self, hidden_states, cu, kwargs):
        path = self.packed_path(hidden_states)
        if path == "per_sample_torch":
            warn_once_fla_backward_blocked(self.fla_backward_blocker)
            return self._fla_forward(hidden_states, cu, kernels=reference_varlen_kernels(self))
        if path == "fla":
            return self._fla_forward(hidden_states, cu)
        return self._per_sample_forward(hidden_states, cu, kwargs)

    def packed_path(self, hidden_states) -> str:
        """How a packed row is computed: "fla" (varlen kernels), "per_sample" (the released forward
        per sample) or "per_sample_torch" (transformers' PyTorch functions per sample: fla's backward
        cannot run here and the released forward would call fla too, see ``fla_rule_importable``).
        An explicit "fla" backend or injected kernels are left alone.  Not conditioned on gradients
        being enabled: reentrant gradient checkpointing runs the first forward without them and
        the recomputation with them, and both must compute the same thing."""
        if self.fla_backward_blocker is not None and self.boundary_backend != "fla" and self.varlen_kernels is None:
            return "per_sample_torch"
        return "fla" if self._uses_fla(hidden_states) else "per_sample"

    def _uses_fla(self, hidden_states) -> bool:
        if self.boundary_backend == "per_sample":
            return False
        # The fla forward mirrors the released layer's projections; a release with another
        # layout (none known) takes the portable path instead of computing something else.
        kernels_here = self.varlen_kernels is not None or (hidden_states.is_cuda and fla_available())
        usable = kernels_here and all(hasattr(self, a) for a in _FLA_LAYOUT)
        if self.boundary_backend == "fla" and not usable:
            raise RuntimeError("boundary_backend='fla' needs flash-linear-attention and a CUDA device "
                               f"(and a layer with {', '.join(_FLA_LAYOUT)})")
        return usable

    def _per_sample_forward(self, hidden_states, cu, kwargs):
        """The released forward on each sample's slice: a fresh state and convolution per sample."""
        batch, length, width = hidden_states.shape
        row = hidden_states.reshape(1, batch * length, width)
        bounds = cu.tolist()  # one host sync per layer; this path is the portable one, not the fast one
        pieces = [super(PackedLinearAttention, self).forward(row[:, start:stop], **kwargs)
                  for start, stop in zip(bounds[:-1], bounds[1:]) if stop > start]
        return torch.cat(pieces, dim=1).reshape(batch, length, -1)

    def _fla_forward(self, hidden_states, cu, kernels=None):
        """The released forward's computation with fla's varlen convolution and delta rule.

        Mirrors ``Qwen3_5GatedDeltaNet.forward`` (transformers 5.17-5.23) without a cache; the
        grouped query/key heads are repeated explicitly (``repeat_interleave``, the grouping of
        transformers' reference kernel) so any fla release computes the same thing.  ``kernels``:
        other functions with fla's signatures (``reference_varlen_kernels``).
        """
        causal_conv1d, chunk_gated_delta_rule = kernels or self.varlen_kernels or fla_kernels()
        batch, length, _ = hidden_states.shape
        tokens = batch * length
        row = hidden_states.reshape(1, tokens, -1)
        cu = _long_boundaries(cu, row.device)

        mixed_qkv = self.in_proj_qkv(row)  # (1, T, 2 * key_dim + value_dim)
        z = self.in_proj_z(row).reshape(1, tokens, -1, self.head_v_dim)
        b = self.in_proj_b(row)
        a = self.in_proj_a(row)
        mixed_qkv, _ = causal_conv1d(mixed_qkv, weight=self.conv1d.weight.squeeze(1), bias=self.conv1d.bias,
                                     activation=self.activation, cu_seqlens=cu)
        query, key, value = torch.split(mixed_qkv, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        query = query.reshape(1, tokens, -1, self.head_k_dim)
        key = key.reshape(1, tokens, -1, self.head_k_dim)
        value = value.reshape(1, tokens, -1, self.head_v_dim)
        if self.num_v_heads != self.num_k_heads:
            group = self.num_v_heads // self.num_k_heads
            query, key = query.repeat_interleave(group, dim=2), key.repeat_interleave(group, dim=2)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * torch.nn.functional.softplus(a.float() + self.dt_bias)
        core, _ = chunk_gated_delta_rule(query, key, value, g=g, beta=beta, initial_state=None,
                                         output_final_state=False, use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
        core = self.norm(core.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
        return self.out_proj(core.reshape(batch, length, -1))


_SUBCLASSES: dict[type, type] = {}


def packable_class(cls: type) -> type:
    """``cls`` with ``PackedLinearAttention``'s forward, under the same name and module."""
    if issubclass(cls, PackedLinearAttention):
        return cls
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(cls.__name__, (PackedLinearAttention, cls),
                                {"__module__": cls.__module__, "__doc__": cls.__doc__})
    return _SUBCLASSES[cls]


def make_linear_attention_packable(model: torch.nn.Module, backend: str = "auto", varlen_kernels=None,
                                   fla_blocker=None) -> int:
    """Give every linear-attention layer of ``model`` the boundary-aware forward, and its language
    model the pre-hook that supplies the boundaries (``attention.supply_packed_boundaries``).

    The layers become instances of ``packable_class(type(layer))``: same parameters, same class
    name, nothing in transformers changed.  Returns the number of layers converted.
    ``varlen_kernels`` replaces fla's ``(causal_conv1d, chunk_gated_delta_rule)`` (tests).
    ``fla_blocker``: why fla's backward cannot run (default: ``fla_backward_blocker_here()``, read
    once here, when the model is loaded for training).
    """
    from .attention import supply_packed_boundaries

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    layers = linear_attention_modules(model)
    blocker = (fla_blocker or fla_backward_blocker_here()) if layers else None
    for _, layer in layers:
        layer.__class__ = packable_class(type(layer))
        layer.boundary_backend = backend
        layer.fla_backward_blocker = blocker
        if varlen_kernels is not None:
            layer.varlen_kernels = tuple(varlen_kernels)
    if layers:
        supply_packed_boundaries(model)
    return len(layers)


class PackingUnsupported(ConfigError):
    """A flattened batch would let one sample's state leak into the next."""


def check_flattening_supported(model: torch.nn.Module) -> None:
    """Raise ``PackingUnsupported`` when ``model`` has linear-attention layers that would carry
    state across packed samples (not converted by ``make_linear_attention_packable``)."""
    from .attention import _HOOK_ATTR, language_models

    leaking = [n for n, m in linear_attention_modules(model) if not isinstance(m, PackedLinearAttention)]
    hooked = all(getattr(lm, _HOOK_ATTR, None) is not None for lm in language_models(model))
    if leaking or (linear_attention_modules(model) and not hooked):
        where = ", ".join(leaking[:3]) + (" ..." if len(leaking) > 3 else "") if leaking else "its language model"
        raise PackingUnsupported(
            f"this model's linear-attention (Gated DeltaNet) layers would carry state from one packed sample into "
            f"the next ({where} cannot see sample boundaries). Load it with qwenvl.train.model.load_model (which "
            f"makes them boundary-aware), or train without --data_flatten / --data_packing / --max_tokens_per_batch.")


class FlaCannotTrain(ConfigError):
    """transformers would call flash-linear-attention's gated delta rule, whose backward fails here."""


_READ_HERE = object()


FLA_INSTALL = ("pip install flash-linear-attention (fla-core's Triton kernels; `pip install \"qwenvl-finetune[gpu]\"` "
               "includes it), with Triton >= 3.7.1 on Hopper GPUs")


def fla_missing_on_gpu() -> bool:
    """Whether this process trains on a CUDA GPU without flash-linear-attention's gated delta rule."""
    return torch.cuda.is_available() and not fla_rule_importable()


def check_linear_attention_trainable(model: torch.nn.Module, flattened: bool, blocker=_READ_HERE,
                                     fla_missing=_READ_HERE) -> None:
    """At start-up: can this model's linear-attention layers train on this machine's fla stack?

    ``blocker``: ``fla_backward_blocker``'s answer (default: ``fla_backward_blocker_here()``).  When
    fla's backward cannot run, flattened batches go through the exact per-sample PyTorch path (one
    warning, here); padded batches, where transformers itself calls fla, are refused with
    ``FlaCannotTrain`` (train() exits with status 2) instead of failing at the first backward.

    ``fla_missing`` (default: ``fla_missing_on_gpu()``): on a GPU without fla every Gated DeltaNet
    layer runs transformers' PyTorch reference (padded rows) or the released forward once per sample
    (packed rows): correct, several times slower than the measured speeds.  That is a warning with
    the install command, so nobody spends GPU hours on the slow path without being told.
    """
    if not linear_attention_modules(model):
        return
    if fla_missing_on_gpu() if fla_missing is _READ_HERE else fla_missing:
        logger.warning("flash-linear-attention is not installed: this model's linear-attention (Gated DeltaNet) "
                       "layers run transformers' PyTorch reference (padded batches) or the released forward one "
                       "sample at a time (packed batches). Correct, but several times slower on a GPU. Fix: %s.",
                       FLA_INSTALL)
        return
    reason = fla_backward_blocker_here() if blocker is _READ_HERE else blocker
    if reason is None:
        return
    if flattened:
        warn_once_fla_backward_blocked(reason)
        return
    raise FlaCannotTrain(
        f"{reason}. transformers calls fla for this model's linear-attention (Gated DeltaNet) layers whenever "
        f"flash-linear-attention is installed, so padded training would stop at the first step. Fix: {FLA_FIXES}; "
        f"or uninstall flash-linear-attention / fla-core (transformers then uses its PyTorch implementation, much "
        f"slower); or train with --data_flatten True (packed rows then take the exact per-sample PyTorch path, "
        f"slower).")
