"""Training side of qwenvl: from flags to a trained, saved model.

- flags: ``arguments`` (model and training flags), ``official_flags`` (the official
  scripts' command lines), ``help``, ``secret_flags``, ``output_dir``, ``run_lock`` (one run
  per folder), ``completed_run``, ``eval_schedule``, ``wandb_mode``, ``library_warnings``;
- the model: ``model`` (load, freeze, LoRA), ``attention`` (packed attention),
  ``linear_attention`` (Gated DeltaNet boundaries), ``compile``, ``sharding`` (FSDP2),
  ``fused_loss`` / ``loss`` (the chunked loss), ``moe`` (router loss);
- the run: ``steps`` (the public steps that build a run: model class, batch sampler,
  trainer), ``length_cache`` (multi-process runs need the cache built first), ``optim``
  (parameter groups), ``trainer`` (the Trainer subclass), ``checkpoints``, ``interrupt``,
  and the entry point ``train_qwen``.

The data side is reached through ``qwenvl.data.dataset.make_supervised_data_module``
(datasets and collator), ``qwenvl.data.batch`` (lengths, budget and the batch sampler,
from ``steps`` and ``length_cache``), ``qwenvl.data.arguments`` / ``errors`` and the
label value ``qwenvl.data.render.IGNORE_INDEX``; nothing in ``qwenvl.data`` imports
``qwenvl.train``.
"""
