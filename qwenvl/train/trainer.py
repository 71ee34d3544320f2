"""``QwenVLTrainer``: the Trainer with rule-based parameter groups and richer logs.

What it adds to ``transformers.Trainer``:

- the optimizer is built from ``optim.build_param_groups`` (per-component learning
  rates, no decay on biases and norms); with a DeepSpeed config that offloads the
  optimizer to CPU, the groups go to DeepSpeed's CPU Adam (DeepSpeed refuses a
  torch optimizer there);
- every training log carries ``lr/<group>`` for each group, and token throughput
  (``tokens_per_second`` and its text / visual split, summed over processes);
- a dataset exposing ``log_metrics() -> dict`` (e.g. skipped-sample counts) has
  those values added to every training log;
- checkpoints are written with ``use_cache=True`` in their config (training runs
  without a KV cache), and, as with any ``processing_class``, with the processor
  and its chat template, so every ``checkpoint-N`` loads like a released model;
- under FSDP2 (``sharding.py``): float32 master weights with bf16 compute and float32
  gradient reduction, and every saved model (checkpoints and the final one) gathered
  into plain safetensors next to the sharded state used for resuming.
"""
from __future__ import annotations

import os
import time

import torch
from transformers import Trainer, TrainerCallback

from .arguments import ConfigError
from .model import set_use_cache
from .optim import build_param_groups, describe_groups

IGNORE_INDEX = -100


class QwenVLTrainer(Trainer):
    def __init__(self, *args, train_batch_sampler=None, **kwargs):
        super().__init__(*args, **kwargs)
        # From qwenvl.data.sampler (online packing, token budgets, length grouping): it yields
        # the global list of batches, and accelerate shards it across processes.
        self.train_batch_sampler = train_batch_sampler
        # The released models declare accepts_loss_kwargs=False, so the Trainer would average
        # the micro-batches' mean losses. Passing the step's count of trained tokens instead
        # makes every optimizer step the per-token mean over all its samples, however they are
        # grouped into micro-batches (padded, flattened, token budget) or spread over ranks.
        self.model_accepts_loss_kwargs = True
        config = self.accelerator.unwrap_model(self.model).config
        # Visual placeholder ids by name from the model config, never literals.
        self._visual_ids = [i for i in (getattr(config, "image_token_id", None),
                                        getattr(config, "video_token_id", None)) if i is not None]
        self._token_counts = None  # [tokens, visual tokens] since the last log, on device
        self._last_log_time = None
        self._step_rates = {}  # lr/<group> of the latest optimizer step
        self.add_callback(_RecordStepRates(self))

    # ---- sharding ----

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp and not self.is_fsdp_enabled:
            self._fsdp_unavailable()
        if self.is_fsdp_enabled and self.accelerator.state.fsdp_plugin.fsdp_version == 2:
            from .sharding import mixed_precision_policy

            # Read by accelerate when it shards the model (Trainer.train -> accelerator.prepare).
            self.accelerator.state.fsdp_plugin.mixed_precision_policy = mixed_precision_policy(self.args)

    def _fsdp_unavailable(self):
        # accelerate enables FSDP only on accelerators (CUDA, XPU, ...); elsewhere it would
        # silently train with DDP instead.
        raise ConfigError("--fsdp needs GPUs: accelerate turns FSDP on only on accelerators, and this run would "
                          "otherwise train unsharded with DDP. Run on GPUs, or drop --fsdp / --fsdp_config.")

    # ---- optimizer ----

    def _offloads_optimizer(self) -> bool:
        if not self.is_deepspeed_enabled:
            return False
        zero = self.args.hf_deepspeed_config.config.get("zero_optimization", {})
        return str(zero.get("offload_optimizer", {}).get("device", "none")) in ("cpu", "nvme")

    def create_optimizer(self, model=None):
        """The optimizer over ``build_param_groups``; DeepSpeed's CPU Adam when ZeRO offloads it."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        groups = build_param_groups(opt_model, self.args)
        if self._offloads_optimizer():
            optim = str(getattr(self.args.optim, "value", self.args.optim))
            if not optim.startswith("adamw"):
                raise ConfigError(f"--optim {optim} cannot run with optimizer offload (DeepSpeed's CPU "
                                  "Adam is the only optimizer there): use --optim adamw_torch or a config without "
                                  "offload_optimizer.")
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            self.optimizer = DeepSpeedCPUAdam(
                groups, lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon, weight_decay=self.args.weight_decay, adamw_mode=True)
        else:
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            if {"params", "model", "optimizer_dict"} & set(kwargs):
                raise ConfigError(f"--optim {self.args.optim} builds its own parameter groups, which would drop the "
                                  "per-component learning rates; use an AdamW-style optimizer.")
            self.optimizer = optimizer_cls(groups, **kwargs)
        if self.is_world_process_zero():
            print("optimizer groups:\n" + describe_groups(groups), flush=True)
        return self.optimizer

    # ---- data ----

    def get_train_dataloader(self):
        """The Trainer's loader, or one over ``train_batch_sampler`` when the run packs or groups."""
        if self.train_batch_sampler is None:
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader

        args = self.args
        loader = DataLoader(
            self.train_dataset, batch_sampler=self.train_batch_sampler, collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor if args.dataloader_num_workers > 0 else None)
        return self.accelerator.prepare(loader)

    # ---- logging ----

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step, counting the batch's real and visual tokens first (for the throughput log)."""
        ids = inputs.get("input_ids")
        if ids is not None:
            mask = inputs.get("attention_mask")
            real = mask.sum() if mask is not None else torch.full((), ids.numel(), device=ids.device, dtype=torch.long)
            visual = torch.isin(ids, self._visual_id_tensor(ids.device)).sum() \
                if self._visual_ids else torch.zeros((), device=ids.device, dtype=torch.long)
            counts = torch.stack([real.to(torch.long), visual.to(torch.long)])
            self._token_counts = counts if self._token_counts is None else self._token_counts + counts
        if self._last_log_time is None:
            self._last_log_time = time.perf_counter()
        return super().training_step(model, inputs, num_items_in_batch)

    def _visual_id_tensor(self, device) -> torch.Tensor:
        # Made once per device: a host-to-device copy every micro-batch would make the CPU wait
        # for the GPU's queued work each step.
        cached = getattr(self, "_visual_ids_on", None)
        if cached is None or cached.device != device:
            cached = self._visual_ids_on = torch.tensor(self._visual_ids, device=device)
        return cached

    def _throughput(self) -> dict:
        if self._token_counts is None or self._last_log_time is None:
            return {}
        counts = self._token_counts
        if self.args.world_size > 1:
            # Every process reaches this log together (the loss above it is gathered too).
            counts = self.accelerator.reduce(counts.to(self.args.device), reduction="sum")
        tokens, visual = (int(x) for x in counts.tolist())
        now = time.perf_counter()
        elapsed = max(now - self._last_log_time, 1e-9)
        self._token_counts, self._last_log_time = None, now
        return {"tokens_per_second": round(tokens / elapsed, 2),
                "text_tokens_per_second": round((tokens - visual) / elapsed, 2),
                "visual_tokens_per_second": round(visual / elapsed, 2)}

    def _group_learning_rates(self) -> dict:
        rates = {}
        for group in getattr(self.optimizer, "param_groups", []):
            name = group.get("name")
            if name:
                rates.setdefault(f"lr/{name.removesuffix('_no_decay')}", group["lr"])
        return rates

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add per-group rates, token throughput and the dataset's metrics to each training log."""
        if "loss" in logs:  # a training log (not eval, not the end-of-training summary)
            logs.update(self._step_rates or self._group_learning_rates())
            logs.update(self._throughput())
            dataset_metrics = getattr(self.train_dataset, "log_metrics", None)
            if callable(dataset_metrics):
                logs.update(dataset_metrics())
        super().log(logs, start_time)

    # ---- resuming ----

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restore a full-model checkpoint through ``from_pretrained``.

        transformers 5 saves these models under their original key names
        (``model.layers.*``, ``visual.*``) while the live modules are
        ``model.language_model.*`` / ``model.visual.*``.  The Trainer's own resume
        loads the file with a non-strict ``load_state_dict`` and so, for these
        families, restores nothing (it only warns).  ``from_pretrained`` maps the names
        back; the weights are then copied, strictly, into the live model.  LoRA
        adapters, DeepSpeed and FSDP checkpoints keep the Trainer's path (their files
        use the live names).
        """
        from peft import PeftModel

        target = self.model if model is None else model
        unwrapped = self.accelerator.unwrap_model(target)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or isinstance(unwrapped, PeftModel) \
                or not os.path.isfile(os.path.join(resume_from_checkpoint, "config.json")):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # float32 holds every saved dtype exactly; copy_ casts back to each live parameter's dtype.
        saved = type(unwrapped).from_pretrained(resume_from_checkpoint, dtype=torch.float32)
        unwrapped.load_state_dict(saved.state_dict(), strict=True)
        del saved

    # ---- saving ----

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As the Trainer's, but under FSDP every rank gathers the full state dict and the main
        process writes it as safetensors, whatever ``state_dict_type`` the sharded
        checkpoints use (with SHARDED_STATE_DICT the Trainer alone would write no model)."""
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call=_internal_call)
        from .sharding import full_state_dict

        state_dict = full_state_dict(self.model)
        self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict=state_dict)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # Saved configs are for inference, which wants the KV cache training runs without.
        model = self.accelerator.unwrap_model(self.model)
        set_use_cache(model, True)
        try:
            super()._save(output_dir, state_dict=state_dict)
        finally:
            set_use_cache(model, False)


class _RecordStepRates(TrainerCallback):
    """Keeps the rates each optimizer step used: the scheduler moves them on before the log,
    and the Trainer's own ``learning_rate`` is taken at this same moment."""

    def __init__(self, trainer: QwenVLTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._step_rates = self.trainer._group_learning_rates()
