"""FSDP2 (PyTorch's ``fully_shard``) as the Trainer and accelerate run it, and what our code adds.

A run turns it on with ``--fsdp "full_shard auto_wrap" --fsdp_config scripts/fsdp2.json``.
accelerate then shards, bottom up: every decoder layer and every vision block (the model's
``_no_split_modules``, so one config serves every family), the input embeddings, a tail
group of the final norm and ``lm_head`` (kept gathered from the norm's forward to the end of
the model's forward), and the root (everything else: patch embedding, merger, ...), except
what ``replicated_frozen_modules`` leaves out (below).  Each parameter is sharded on its own,
so frozen and trainable parameters may share a group.

What this module adds around that:

- **Mixed precision** (``mixed_precision_policy``): compute in bf16 on gathered bf16 copies,
  master weights and optimizer state in float32 and sharded, the model's outputs (the loss)
  left in float32.  Gradients are reduce-scattered in ``fsdp_config["reduce_dtype"]``:
  float32 when the key is absent; ``scripts/fsdp2.json`` says ``bfloat16``, which is what
  DeepSpeed's ZeRO-2 and ZeRO-3 do in a bf16 run (their ``communication_data_type``
  defaults to the bf16 of the model): each rank's gradient is computed in bf16 either way,
  and the bf16 reduction adds one rounding of the sum, for half the bytes on the wire.
- **The frozen vision tower is replicated, not sharded** (``replicated_frozen_modules``,
  ``fsdp_config["replicate_frozen_vision"]``, on unless false): frozen parameters have no
  gradients or optimizer state to shard, so sharding them saves only their bf16 copy (at
  most about 0.7 GB per GPU for these towers) and costs an all-gather of every vision
  block at every step.  Left out of ``fully_shard`` (accelerate's ``ignored_modules``),
  they stay whole on every GPU, and their block class is no longer a wrapping unit when no
  block of it trains.  A tower that trains (``--tune_mm_vision``, or LoRA adapters in it)
  stays sharded.
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
- **HSDP across nodes** (``hsdp_layout``, ``fsdp_config["hsdp_replicas"]``): shard inside a
  group of GPUs, replicate the groups.  ``"hsdp_replicas": "nodes"`` makes each node a shard
  group (one replica per node), a number N makes N equal groups of consecutive ranks.  Per
  step, the all-gathers and reduce-scatters stay inside the group (NVLink), and only the
  shard's gradient all-reduce between replicas crosses the network: 1/(group size) of the
  gradients instead of all parameters two or three times (``benchmarks/RESULTS.md``, "Scaling
  on paper").  Built as accelerate's ``ParallelismConfig(dp_replicate_size, dp_shard_size)``,
  which gives ``fully_shard`` a 2-D device mesh.
- **CPU offload** (``"cpu_offload": true``): shards, gradients and optimizer state in host
  memory; the process group then needs gloo beside NCCL (``process_group_backend``).
- **A clean exit** (``finish_distributed``): all ranks meet, then the process group is
  destroyed.  Without it a rank can leave while another is still in a collective, and the
  NCCL communicator's teardown at interpreter exit then waits (the 2x H200 run that
  "saved its model and had not exited 90 s later").
"""
from __future__ import annotations

import json
import os
from pathlib import Path

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


REDUCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fsdp_options(training_args) -> dict:
    """The run's ``fsdp_config`` (a dict once the Trainer's arguments parsed it; {} without one)."""
    return dict(getattr(training_args, "fsdp_config", None) or {})


def reduce_dtype(training_args) -> torch.dtype:
    """The gradient reduce-scatter dtype: ``fsdp_config["reduce_dtype"]``, float32 when absent."""
    from .arguments import ConfigError

    name = str(fsdp_options(training_args).get("reduce_dtype", "float32"))
    if name not in REDUCE_DTYPES:
        raise ConfigError(f"--fsdp_config: reduce_dtype must be one of {', '.join(REDUCE_DTYPES)}, not {name!r} "
                          "(bfloat16 is what DeepSpeed ZeRO reduces in for a bf16 run; float32 sums at full "
                          "precision).")
    return REDUCE_DTYPES[name]


def parse_hsdp_replicas(value) -> int | str | None:
    """``fsdp_config["hsdp_replicas"]`` checked: None (absent), ``"nodes"`` or a positive int."""
    if value is None or value == "nodes":
        return value
    if isinstance(value, bool) or not str(value).strip().isdigit() or int(value) < 1:
        raise _config_error(f'--fsdp_config: hsdp_replicas must be a positive whole number or "nodes", '
                            f"not {value!r}.")
    return int(value)


def hsdp_layout(value, world_size: int, local_world_size: int) -> tuple[int, int] | None:
    """(replicas, GPUs per shard group) that ``fsdp_config["hsdp_replicas"]`` asks for on
    ``world_size`` processes, ``local_world_size`` per node; None for plain full sharding (key
    absent, 1, or ``"nodes"`` on one node).  Raises ``ConfigError`` naming the fix otherwise."""
    value = parse_hsdp_replicas(value)
    if value is None:
        return None
    replicas = max(1, world_size // max(1, local_world_size)) if value == "nodes" else value
    if replicas == 1:
        return None
    if world_size % replicas:
        raise _config_error(f"--fsdp_config: hsdp_replicas {replicas} does not divide the {world_size} processes "
                            "into equal shard groups; use a divisor of the process count, or \"nodes\".")
    if replicas == world_size:
        raise _config_error(f"--fsdp_config: hsdp_replicas {replicas} equals the number of processes, so every "
                            "shard group would hold one GPU (that is plain data parallelism): use fewer replicas, or "
                            "drop --fsdp to train with DDP.")
    return replicas, world_size // replicas


def hsdp_parallelism_config(training_args):
    """accelerate's ``ParallelismConfig`` for the HSDP the run's ``fsdp_config`` asks for, or None."""
    value = fsdp_options(training_args).get("hsdp_replicas")
    if value is None:
        return None
    if fsdp_version(training_args) != 2:
        raise _config_error("--fsdp_config: hsdp_replicas needs FSDP2 (\"fsdp_version\": 2).")
    world = int(training_args.world_size)
    layout = hsdp_layout(value, world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if layout is None:
        return None
    from accelerate import ParallelismConfig

    return ParallelismConfig(dp_replicate_size=layout[0], dp_shard_size=layout[1])


def sharding_mesh(model: torch.nn.Module) -> dict[str, int] | None:
    """{mesh dimension: size} of the device mesh the model's sharded parameters live on (FSDP2),
    or None when no parameter is a DTensor."""
    for param in model.parameters():
        if _is_dtensor(param):
            mesh = param.device_mesh
            names = mesh.mesh_dim_names or tuple(f"dim{i}" for i in range(mesh.ndim))
            return dict(zip(names, mesh.shape))
    return None


def mixed_precision_policy(training_args):
    """bf16/fp16 compute, gradients reduced in ``reduce_dtype``, outputs left as computed; None in fp32 runs."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if training_args.bf16:
        half = torch.bfloat16
    elif training_args.fp16:
        half = torch.float16
    else:
        return None
    # output_dtype None: the loss leaves the model in float32 (accelerate's default would cast
    # it to the half type).  reduce_dtype: float32 sums the ranks' gradients at full precision,
    # as DDP with float32 master weights does; bfloat16 as DeepSpeed ZeRO does in bf16 runs.
    return MixedPrecisionPolicy(param_dtype=half, reduce_dtype=reduce_dtype(training_args), output_dtype=None)


def replicated_frozen_modules(model: torch.nn.Module, training_args) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of the largest vision-tower submodules whose parameters are all frozen, to be
    kept out of ``fully_shard`` (replicated on every GPU); [] when ``fsdp_config`` says
    ``"replicate_frozen_vision": false`` or the tower trains.  The merger is never among them (it is
    a component of its own, trained with ``--tune_mm_mlp``), so a trainable merger stays sharded."""
    from .model import component_of

    if not _truthy(fsdp_options(training_args).get("replicate_frozen_vision", True)):
        return []
    # peft's modules_to_save wrapper (LoRA with --tune_mm_vision) keeps a frozen original copy that
    # the forward never calls: sharded, it is never gathered, so replicating it would only cost memory.
    unused = {id(m.original_module) for m in model.modules()
              if hasattr(m, "original_module") and hasattr(m, "modules_to_save")}
    chosen: list[tuple[str, torch.nn.Module]] = []
    skipped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in [n for n, _ in chosen] + skipped):
            continue
        if id(module) in unused:
            skipped.append(name)
            continue
        params = list(module.named_parameters(prefix=name))
        if params and all(not p.requires_grad and _component(n, component_of) == "vision" for n, p in params):
            chosen.append((name, module))
    return chosen


def _component(name: str, component_of) -> str | None:
    try:
        return component_of(name)
    except ValueError:
        return None


def _truthy(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() not in ("false", "0", "no", "off")


def configure_fsdp2_plugin(plugin, model: torch.nn.Module, training_args, device) -> list[str]:
    """Set accelerate's FSDP2 plugin for ``model`` before it is sharded: our mixed precision policy,
    and the frozen vision tower left out of ``fully_shard`` (moved to ``device`` here, since
    ``fully_shard`` moves only what it shards).  Returns the names of the replicated modules."""
    plugin.mixed_precision_policy = mixed_precision_policy(training_args)
    replicated = replicated_frozen_modules(model, training_args)
    if not replicated:
        return []
    modules = [module for _, module in replicated]
    for module in modules:
        module.to(device)
    existing = list(plugin.ignored_modules) if isinstance(plugin.ignored_modules, (list, tuple, set)) else []
    if isinstance(plugin.ignored_modules, str):
        raise _config_error("--fsdp_config: ignored_modules as a pattern cannot be combined with "
                            "replicate_frozen_vision; list the modules or set \"replicate_frozen_vision\": false.")
    plugin.ignored_modules = existing + modules
    # A wrapping unit whose every instance is replicated would be an FSDP group without parameters:
    # hooks at every block for nothing.  Keep the others (the decoder layer, a training block class).
    inside = {id(m) for module in modules for m in module.modules()}
    names = plugin.transformer_cls_names_to_wrap or list(getattr(model, "_no_split_modules", None) or [])
    keep = [cls for cls in names
            if any(type(m).__name__ == cls and id(m) not in inside for m in model.modules())
            or not any(type(m).__name__ == cls for m in model.modules())]
    if names:
        plugin.transformer_cls_names_to_wrap = keep
    return [name for name, _ in replicated]


def _config_error(message: str):
    from .arguments import ConfigError

    return ConfigError(message)


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


# NCCL for the GPU collectives, gloo for those on CPU tensors.
CPU_OFFLOAD_BACKEND = "cuda:nccl,cpu:gloo"


def wants_cpu_offload(fsdp, fsdp_config) -> bool:
    """Whether ``--fsdp`` / ``--fsdp_config`` as given on the command line (a string, a list, or the
    config as a path or dict, keys with or without the ``fsdp_`` prefix) ask for CPU offload:
    ``"cpu_offload": true`` in the config, or ``offload`` among the ``--fsdp`` words."""
    if not fsdp:
        return False
    words = fsdp.split() if isinstance(fsdp, str) else list(fsdp) if isinstance(fsdp, (list, tuple)) else []
    if "offload" in words:
        return True
    if isinstance(fsdp_config, (str, os.PathLike)):
        try:
            fsdp_config = json.loads(Path(fsdp_config).read_text())
        except (OSError, ValueError):
            return False  # the Trainer's own parsing reports an unreadable config
    if not isinstance(fsdp_config, dict):
        return False
    value = fsdp_config.get("cpu_offload", fsdp_config.get("fsdp_cpu_offload", False))
    return value is True or str(value).lower() in ("true", "1")


def process_group_backend(fsdp, fsdp_config, requested: str | None, use_cpu: bool,
                          distributed: bool | None = None) -> str | None:
    """The ``torch.distributed`` backend the run's process group needs (``--ddp_backend``).

    With FSDP2's CPU offload on GPUs the gradients stay in host memory, so the gradient-norm
    all-reduce of ``--max_grad_norm`` and the final save's full-state gather are collectives on CPU
    tensors, which a NCCL-only group refuses ("No backend type associated with device type cpu") at
    the first optimizer step.  accelerate picks ``cuda:nccl,cpu:gloo`` itself only when launched
    with its own FSDP environment variables, which the Trainer does not set.  A backend the user
    named other than ``nccl`` (or its per-device spelling ``cuda:nccl``) is kept; on CPU (gloo)
    there is nothing to add.  ``distributed``
    (default: launched by torchrun, ``LOCAL_RANK`` set): a single process has no group to start, and
    accelerate fails on a backend given to one."""
    if distributed is None:
        distributed = int(os.environ.get("LOCAL_RANK", "-1")) != -1
    nccl_alone = requested in (None, "nccl", "cuda:nccl")
    if not distributed or use_cpu or not nccl_alone or not wants_cpu_offload(fsdp, fsdp_config):
        return requested
    return CPU_OFFLOAD_BACKEND


def cpu_offloaded(fsdp_plugin) -> bool:
    """Whether accelerate's FSDP2 plugin shards with PyTorch's CPU offload policy (``"cpu_offload":
    true``): the shards, their gradients and the optimizer state stay in host memory."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    return isinstance(getattr(fsdp_plugin, "cpu_offload", None), CPUOffloadPolicy)


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
