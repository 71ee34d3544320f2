"""Regional compilation: ``torch.compile`` each repeated layer of the model in place.

What it buys.  A Qwen-VL decoder layer is a handful of large matmuls surrounded by
many small element-wise kernels: RMSNorm in float32 (upcast, square, mean, rsqrt,
scale, downcast), the rotary embedding (slices, negation, concatenation, products),
SiLU-and-multiply, residual additions.  Run eagerly each of these reads and writes
the whole activation from GPU memory; at a few thousand tokens they take about as
long as the matmuls.  Inductor fuses each chain into one kernel, and its partitioner
saves fewer activations for the backward pass (cheap element-wise results are
recomputed), which also lowers peak memory.

Why regional.  Compiling the whole model recompiles whenever the vision inputs change
shape and breaks its graph at the data-dependent vision and mRoPE code; the decoder
layers and vision blocks are where the time goes, they repeat (36 layers share one
compiled graph, so compilation costs one layer's worth, not 36), and their inputs
only vary in token count, which ``dynamic=True`` keeps symbolic (no recompilation per
batch shape).  PyTorch calls this "regional compilation".

In place.  ``nn.Module.compile()`` keeps the module object, its class, its hooks and
its parameter names: checkpoints are written exactly as without compilation (no
``_orig_mod.`` prefixes), and gradient checkpointing, set by the Trainer afterwards on
the same layer objects, still applies.

Attention inside a compiled layer runs eagerly: our varlen function derives the
packed-sequence boundaries from the position ids (a data-dependent ``nonzero``), so it
is excluded from tracing (see ``attention.make_attention_forward``); each layer then
compiles into the part before attention and the part after it.
"""
from __future__ import annotations

import logging

import torch

from qwenvl.train.attention import VARLEN_ATTENTION

logger = logging.getLogger(__name__)

# How many compiled versions dynamo keeps of one function before it runs that function eagerly for good
# (torch's ``recompile_limit``, 8 by default). Every transformers layer, vision block and decoder layer
# alike, runs through one function (GradientCheckpointingLayer's forward wrapper), so they share those 8.
# Measured on an H200 (torch 2.11): Qwen2.5-VL vision blocks at released widths meeting images of 64 to
# 19,600 patches were recompiled for each range of patch counts that Inductor's passes guard on (up to
# 1,279, 1,281-3,419, from 3,420, from 4,096; shape padding and reductions), once for the window and once
# for the full-attention blocks: 8 versions in training alone, so the first evaluation (no grad) hit the
# limit and the blocks ran eagerly from then on, slower and without the activation budget. The ranges are
# few and fixed by the model's widths, so a higher limit bounds the compiles (about 5 s each) and keeps
# every layer compiled.
RECOMPILE_LIMIT = 64


def repeated_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The model's repeated blocks: transformers' checkpointable layers (decoder layers of the
    language model, vision blocks), by module name, in model order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, GradientCheckpointingLayer)]


def compile_layers(model: torch.nn.Module, dynamic: bool = True, activation_memory_budget: float | None = None
                   ) -> int:
    """Compile every repeated layer of ``model`` in place; returns how many were compiled.

    ``dynamic=True``: token counts are symbolic from the first call, so packed batches of
    ever-changing length reuse one graph.  Compilation itself happens lazily, at the
    first forward (a minute or two for the first layer of each kind on a GPU; the
    other layers reuse its graph).

    ``activation_memory_budget`` (0 < b <= 1): the fraction of its activations each compiled
    layer may keep for the backward pass; the compiler recomputes the rest, cheapest first
    (element-wise work before matmuls).  A finer alternative to whole-layer gradient
    checkpointing; it sets PyTorch's process-wide ``torch._functorch.config.activation_memory_budget``.

    Raises dynamo's process-wide ``recompile_limit`` to at least ``RECOMPILE_LIMIT`` (see there).
    """
    layers = repeated_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no repeated layers to compile; is this a Qwen-VL model?")
    if activation_memory_budget is not None:
        if not 0 < activation_memory_budget <= 1:
            raise ValueError(f"activation_memory_budget must be in (0, 1], got {activation_memory_budget}")
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = float(activation_memory_budget)
    looping = [(name, layer) for name, layer in layers if loops_over_images(layer)]
    if looping:
        eager = {name for name, _ in looping}
        layers = [(name, layer) for name, layer in layers if name not in eager]
        logger.warning("--compile_layers: the %d vision blocks stay uncompiled: with %s attention transformers "
                       "runs them one image at a time in a Python loop, which would recompile at every new "
                       "number of images per batch; flash_attention_2 or %s compiles them too",
                       len(looping), _implementation(looping[0][1]), VARLEN_ATTENTION)
    import torch._dynamo.config as dynamo_config

    # torch 2.6 names it cache_size_limit (renamed after 2.6, which keeps the old name as an alias).
    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), RECOMPILE_LIMIT))
    for _, layer in layers:
        layer.compile(dynamic=dynamic)
    kinds = sorted({type(layer).__name__ for _, layer in layers})
    logger.info("compiled %d layers in place (%s)", len(layers), ", ".join(kinds))
    return len(layers)


def _implementation(layer: torch.nn.Module) -> str | None:
    attention = getattr(layer, "attn", None)  # vision blocks name it attn, decoder layers self_attn
    return getattr(getattr(attention, "config", None), "_attn_implementation", None)


def loops_over_images(layer: torch.nn.Module) -> bool:
    """Whether ``layer`` is a vision block whose attention transformers runs per image in Python.

    The Qwen vision attentions (Qwen2-VL to Qwen3.5) take the packed ``cu_seqlens`` path only
    for attention implementations named "flash" (flash_attention_2/3, our varlen ones); for any
    other (sdpa, eager) they split the batch into images and loop.  Compiled, that loop's length
    is a guard: every new number of images per batch recompiles, until torch's recompile limit
    turns the block eager for good.
    """
    implementation = _implementation(layer)
    return implementation is not None and "flash" not in implementation


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module`` was compiled in place with ``nn.Module.compile()``."""
    return getattr(module, "_compiled_call_impl", None) is not None
