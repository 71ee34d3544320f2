"""The steps that build a training run, as public functions with explicit arguments.

``train_qwen._train`` composes them in order; the benchmarks and tools call the same
functions, so what they measure is what training builds (no copies kept in step by tests):

    model_class_for_run(config, model_args, training_args)   the class the model loads with
    train_batch_sampler(dataset, training_args, check_cache)  packing / grouping sampler, or None
    build_trainer(model, training_args, processor, data_module, batch_sampler, ...)
"""
from __future__ import annotations

from types import SimpleNamespace

from .model import model_class_for


def uses_zero3(training_args) -> bool:
    """Whether ``training_args`` run under DeepSpeed ZeRO-3 (the Trainer's parsed ``--deepspeed`` config)."""
    config = getattr(training_args, "hf_deepspeed_config", None)
    return bool(config is not None and config.is_zero3())


def model_class_for_run(config, model_args, training_args):
    """The class a run's model is built with: the family's class from ``config.model_type``, or its
    training subclass (``fused_loss.with_training_forward``) when the run needs one.

    The subclass is chosen with ``--loss_kernel`` fused (or auto outside ZeRO-3), when the
    vision tower must run on batches without images (ZeRO-3 or FSDP, or DDP with a trainable
    tower or merger), and for MoE models trained with the router load-balancing loss
    (``--router_aux_loss_coef``, ``moe.py``).  For MoE models this also writes the
    coefficient into ``config`` (the forward reads it there), so pass the config the model
    is then built from.
    """
    from .fused_loss import use_fused_loss, vision_sync_for, with_training_forward
    from .moe import router_aux_loss_coef, set_router_aux_loss_coef

    cls = model_class_for(config.model_type)
    zero3 = uses_zero3(training_args)
    fused = use_fused_loss(getattr(training_args, "loss_kernel", "model"), zero3)
    sync = vision_sync_for(zero3, distributed=training_args.world_size > 1,
                           visual_trainable=bool(model_args.tune_mm_vision or model_args.tune_mm_mlp),
                           fsdp=bool(getattr(training_args, "fsdp", None)))
    # MoE: the router load-balancing loss trains with the model (moe.py); 0 turns it off.
    coef = router_aux_loss_coef(config, getattr(training_args, "router_aux_loss_coef", None))
    if coef:
        set_router_aux_loss_coef(config, coef)
    if fused or sync or coef:
        return with_training_forward(cls, fused_loss=fused, vision_sync=sync, router_aux_loss=bool(coef))
    return cls


def train_batch_sampler(dataset, training_args, check_cache=None):
    """Online packing / length grouping over the length cache, or None for the Trainer's sampler.

    The token budget per micro-batch is ``--max_tokens_per_batch`` (else ``--model_max_length``),
    or, with ``--token_budget_samples``, the one that holds about that many samples per
    optimizer step on average (``qwenvl.data.batch.budget``).

    ``check_cache(dataset)`` runs first when the cache is needed (it stops a
    multi-process run whose cache is missing: ``qwenvl.train.length_cache``)."""
    from qwenvl.data.batch.length_cache import dataset_lengths
    from qwenvl.data.batch.sampler import make_train_sampler

    samples = getattr(training_args, "token_budget_samples", None)
    packing = training_args.online_packing or training_args.max_tokens_per_batch is not None or samples is not None
    grouping = training_args.group_by_modality_length or \
        getattr(training_args, "train_sampling_strategy", "random") == "group_by_length"
    if not (packing or grouping):
        return None
    if check_cache is not None:
        check_cache(dataset)
    # Rank 0 counts (or reads) the length cache first; the others then read it.
    with training_args.main_process_first(desc="length cache"):
        rows, _ = dataset_lengths(dataset, num_workers=training_args.dataloader_num_workers,
                                  progress=training_args.process_index == 0)
    budget = training_args.max_tokens_per_batch or training_args.model_max_length
    if samples is not None:
        from qwenvl.data.batch.budget import budget_for_samples

        budget, mean = budget_for_samples(rows, samples, training_args.gradient_accumulation_steps)
        if training_args.process_index == 0:
            print(f"token budget {budget} per micro-batch: about {samples} samples per optimizer step and process "
                  f"(mean {mean:.0f} tokens per sample, {training_args.gradient_accumulation_steps} micro-batches "
                  "per step)", flush=True)
    settings = SimpleNamespace(
        online_packing=packing, pack_max_tokens=budget,
        max_patches_per_pack=training_args.max_patches_per_pack,
        group_by_modality_length=training_args.group_by_modality_length,
        train_sampling_strategy=getattr(training_args, "train_sampling_strategy", "random"),
        per_device_train_batch_size=training_args.per_device_train_batch_size)
    return make_train_sampler(dataset, rows, settings, world_size=training_args.world_size, rank=None,
                              seed=training_args.seed)


def build_trainer(model, training_args, processor, data_module: dict, batch_sampler=None, *,
                  trainer_class=None, callbacks=None):
    """The trainer of a run: ``trainer_class`` (default ``QwenVLTrainer``, or a subclass of it) over
    ``data_module`` (``make_supervised_data_module``'s train/eval datasets and collator), with the
    processor saved in every checkpoint and ``batch_sampler`` (``train_batch_sampler``) feeding it."""
    from .trainer import QwenVLTrainer

    cls = trainer_class or QwenVLTrainer
    return cls(model=model, args=training_args, processing_class=processor, callbacks=callbacks,
               train_batch_sampler=batch_sampler, **data_module)
