"""FSDP2 (PyTorch's ``fully_shard``) as the Trainer and accelerate run it, and what our code adds.

A run turns it on with ``--fsdp "full_shard auto_wrap" --fsdp_config scripts/fsdp2.json``.
accelerate then shards, bottom up: every decoder layer and every vision block (the model's
``_no_split_modules``, so one config serves every family), the input embeddings, a tail
group of the final norm and ``lm_head`` (kept gathered from the norm's forward to the end of
the model's forward), and the root (everything else: patch embedding, merger, ...).  Each
parameter is sharded on its own, so frozen and trainable parameters may share a group.

What this module adds around that:

- **Mixed precision** (``mixed_precision_policy``): compute in bf16 on gathered bf16 copies,
  master weights and optimizer state in float32 and sharded, gradients reduced in float32
  (accelerate's default reduces in bf16 and casts the model's outputs, the loss included,
  to bf16).
- **The loss reads ``lm_head`` outside ``lm_head``'s forward** (``gathered_weight``): the
  fused loss multiplies the hidden states by the head's weight itself.  Inside the model's
  forward FSDP2 keeps that group gathered (plain tensor); if a version of FSDP2 left it
  sharded (a DTensor, ``aten.mm.default got mixed torch.Tensor and DTensor``), the group is
  gathered through FSDP's own ``unshard()``, so the gradient still lands in the gathered
  parameter and FSDP reduce-scatters it after the backward as for every other parameter.
- **Checkpoints as plain safetensors** (``full_state_dict``): every rank takes part in
  gathering the full state dict; the main process writes it with ``save_pretrained``, so
  each ``checkpoint-N`` and the final folder load with the Auto classes.  The sharded
  model and optimizer state (``pytorch_model_fsdp_0/``, ``optimizer_0/``, with
  ``state_dict_type SHARDED_STATE_DICT``) sit next to it for resuming.
- **A clean exit** (``finish_distributed``): all ranks meet, then the process group is
  destroyed.  Without it a rank can leave while another is still in a collective, and the
  NCCL communicator's teardown at interpreter exit then waits (the 2x H200 run that
  "saved its model and had not exited 90 s later").
"""
from __future__ import annotations

import torch


def fsdp_enabled(training_args) -> bool:
    """Whether the run asks for FSDP (``--fsdp ...``)."""
    return bool(getattr(training_args, "fsdp", None))


def fsdp_version(training_args) -> int | None:
    """The FSDP version the run asks for (2 unless its ``fsdp_config`` says 1), or None without FSDP."""
    if not fsdp_enabled(training_args):
        return None
    config = getattr(training_args, "fsdp_config", None) or {}
    return int(config.get("version", config.get("fsdp_version", 2)))


def mixed_precision_policy(training_args):
    """bf16/fp16 compute, float32 gradient reduction, outputs left as computed; None in fp32 runs."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if training_args.bf16:
        half = torch.bfloat16
    elif training_args.fp16:
        half = torch.float16
    else:
        return None
    # output_dtype None: the loss leaves the model in float32 (accelerate's default would cast
    # it to the half type).  reduce_dtype float32: gradients of two ranks are summed at full
    # precision, as DDP with float32 master weights does.
    return MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32, output_dtype=None)


def gathered_weight(module: torch.nn.Module) -> torch.Tensor:
    """``module.weight`` as a plain (gathered) tensor, for code that reads it outside ``module.forward``.

    Under FSDP2 the weight is a DTensor shard unless its group is gathered; gathering goes
    through ``FSDPModule.unshard()`` so that FSDP, not autograd on the DTensor, owns the
    gradient (reduce-scatter, averaging over ranks, float32 master update).
    """
    weight = module.weight
    if not _is_dtensor(weight):
        return weight
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        raise RuntimeError(f"{type(module).__name__}.weight is a DTensor but the module is not sharded by FSDP2; "
                           "cannot gather it for the fused loss (use --loss_kernel model).")
    module.unshard()
    weight = module.weight
    if _is_dtensor(weight):
        raise RuntimeError("FSDP2's unshard() left lm_head's weight sharded; use --loss_kernel model.")
    return weight


def _is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of an FSDP2 model, on the CPU, on every rank.

    Every rank must call it (it all-gathers).  Tensors keep their training dtype (float32
    for trainable parameters, the load dtype for frozen ones)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def finish_distributed() -> None:
    """After a successful run: all ranks meet, then the process group is destroyed.

    Only on success: when one rank failed, the others may be inside a collective, and a
    barrier or destroy would then wait forever (torchrun ends them instead)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
