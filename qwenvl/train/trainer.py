"""``QwenVLTrainer``: the Trainer with rule-based parameter groups and richer logs.

What it adds to ``transformers.Trainer``:

- the optimizer is built from ``optim.build_param_groups`` (per-component learning
  rates, no decay on biases and norms); with a DeepSpeed config that offloads the
  optimizer to CPU, the groups go to DeepSpeed's CPU Adam (DeepSpeed refuses a
  torch optimizer there); a DeepSpeed config's ``"optimizer"`` section is built by DeepSpeed
  over the same groups (transformers would hand it all parameters as one group, decaying
  biases and norms at one rate); a DeepSpeed config's ``"scheduler"`` gets its rates as one
  value per group (``deepspeed_schedule.py``), so each group keeps its own rate;
- every training log carries ``lr/<group>`` for each group (the rates that step trained at, also under
  DeepSpeed, whose engine moves the schedule on inside the step), and token throughput
  (``tokens_per_second`` and its text / visual split, summed over processes);
- MoE models log their router load-balancing loss (unscaled, mean over the micro-batches
  since the last log and over processes) as ``router_aux_loss``;
- a dataset exposing ``log_metrics() -> dict`` (e.g. skipped-sample counts) has
  those values added to every training log (``skipped_samples`` summed over ranks
  as distinct items);
- checkpoints are written with ``use_cache=True`` in their config (training runs
  without a KV cache), and, as with any ``processing_class``, with the processor
  and its chat template, so every ``checkpoint-N`` loads like a released model;
- a checkpoint counts only once complete (``checkpoints.COMPLETE_MARKER``, written
  after every rank's files are synced), a full disk is named with the bytes needed,
  and Ctrl-C / SIGTERM save and stop at the end of the step (``interrupt.StopOnSignal``);
- resuming a full model reads the checkpoint in the training dtype, on one rank
  when DDP will copy it to the others; the restored learning rates are moved onto this
  run's schedule at the resumed step, so an extended run never trains a step at the
  checkpoint's stale last rate (``resume_schedule.py``);
- under FSDP2 (``sharding.py``): float32 master weights with bf16 compute, gradients
  reduced in the config's ``reduce_dtype``, the frozen vision tower replicated, and every
  saved model (checkpoints and the final one) gathered into plain safetensors next to the
  sharded state used for resuming.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import time

import torch
from transformers import Trainer, TrainerCallback
from transformers.training_args import ParallelMode

from qwenvl.hf_internals import count_loss_over_tokens

from .arguments import ConfigError
from .checkpoints import (DiskFullError, check_free_space, checkpoint_folders, disk_full_message, folder_bytes,
                          is_complete, mark_complete, remove_stale_checkpoints)
from .deepspeed_schedule import describe_spread, spread_rates_over_groups
from .interrupt import StopOnSignal
from .model import set_use_cache
from .optim import build_param_groups, describe_groups
from .resume_schedule import align_resumed_schedule, describe_realignment, holds_schedule_state

logger = logging.getLogger(__name__)


class QwenVLTrainer(Trainer):
    def __init__(self, *args, train_batch_sampler=None, **kwargs):
        super().__init__(*args, **kwargs)
        # From qwenvl.data.batch.sampler (online packing, token budgets, length grouping): it yields
        # the global list of batches, and accelerate shards it across processes.
        self.train_batch_sampler = train_batch_sampler
        # The released models declare accepts_loss_kwargs=False, so the Trainer would average
        # the micro-batches' mean losses. Passing the step's count of trained tokens instead
        # makes every optimizer step the per-token mean over all its samples, however they are
        # grouped into micro-batches (padded, flattened, token budget) or spread over ranks.
        count_loss_over_tokens(self)
        config = self.accelerator.unwrap_model(self.model).config
        # Visual placeholder ids by name from the model config, never literals.
        self._visual_ids = [i for i in (getattr(config, "image_token_id", None),
                                        getattr(config, "video_token_id", None)) if i is not None]
        self._token_counts = None  # [tokens, visual tokens] since the last log, on device
        self._last_log_time = None
        self._step_rates = {}  # lr/<group> the latest optimizer step trained at (taken as its micro-batches start)
        self._step_first_rate = None  # parameter group 0's rate at that step: the Trainer's "learning_rate"
        self._router_aux = None  # [sum of router_aux_loss, micro-batches] since the last log, on device
        self.add_callback(_ReportShardingMesh(self))
        self.stop_on_signal = StopOnSignal()
        self.add_callback(self.stop_on_signal)

    # ---- sharding ----

    def create_accelerator_and_postprocess(self):
        if self.args.fsdp and self.args.parallelism_config is None and self.args.device.type != "cpu":
            from .sharding import hsdp_parallelism_config

            # HSDP (fsdp_config hsdp_replicas): accelerate builds the 2-D mesh from this.  Not on CPU,
            # where accelerate has no FSDP and the run stops below with the reason.
            self.args.parallelism_config = hsdp_parallelism_config(self.args)
        super().create_accelerator_and_postprocess()
        if self.args.fsdp and not self.is_fsdp_enabled:
            self._fsdp_unavailable()
        if self.is_fsdp_enabled and self.accelerator.state.fsdp_plugin.fsdp_version == 2:
            from .sharding import configure_fsdp2_plugin

            # Read by accelerate when it shards the model (Trainer.train -> accelerator.prepare).
            replicated = configure_fsdp2_plugin(self.accelerator.state.fsdp_plugin, self.model, self.args,
                                                self.args.device)
            if replicated and self.args.process_index == 0:
                print(f"FSDP2: frozen {', '.join(replicated)} replicated on every GPU, not sharded "
                      "(fsdp_config replicate_frozen_vision)", flush=True)

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
        """The optimizer over ``build_param_groups``; DeepSpeed's CPU Adam when ZeRO offloads it. With a
        DeepSpeed config's ``"optimizer"`` section, that optimizer over the same groups."""
        if self.optimizer is not None and not self._holds_deepspeeds_one_group():
            return self.optimizer
        opt_model = self.model if model is None else model
        groups = build_param_groups(opt_model, self.args)
        if self.optimizer is not None:
            # transformers hands DeepSpeed every trainable parameter as one group (accelerate's DummyOptim),
            # so its optimizer would decay biases and norms and train every part at --learning_rate. DummyOptim
            # carries parameter groups as well: DeepSpeed builds the section's optimizer over ours, each group
            # with its own rate and decay, the section's type and its other settings as written.
            from accelerate.utils import DummyOptim

            placeholder = self.optimizer
            self.optimizer = DummyOptim(groups, lr=placeholder.lr, weight_decay=placeholder.weight_decay,
                                        **placeholder.kwargs)
            optim = str(getattr(self.args.optim, "value", self.args.optim))
            if optim != "adamw_torch" and self.is_world_process_zero():  # not the default: asked for by name
                section = self.accelerator.state.deepspeed_plugin.deepspeed_config.get("optimizer") or {}
                logger.warning("--optim %s is not used: the DeepSpeed config's \"optimizer\" section (%s) chooses "
                               "the optimizer. Remove the section to use --optim.", optim, section.get("type"))
        elif self._offloads_optimizer():
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
        spread = self._schedule_rates_per_group(groups)
        if self.is_world_process_zero():
            print("optimizer groups:\n" + describe_groups(groups) + (f"\n{spread}" if spread else ""), flush=True)
        return self.optimizer

    def _holds_deepspeeds_one_group(self) -> bool:
        """Whether ``self.optimizer`` is transformers' placeholder for a DeepSpeed "optimizer" section, still
        over all trainable parameters as one group (``deepspeed_init`` made it; ``create_optimizer`` regroups)."""
        if not self.is_deepspeed_enabled:
            return False
        from accelerate.utils import DummyOptim

        return isinstance(self.optimizer, DummyOptim) and not (
            self.optimizer.params and isinstance(self.optimizer.params[0], dict))

    def _schedule_rates_per_group(self, groups: list[dict]) -> str | None:
        """With a DeepSpeed config's "scheduler" section, its rates as one list per group (``deepspeed_schedule.py``),
        written into the config DeepSpeed builds that scheduler from, after this call (transformers'
        ``deepspeed_optim_sched``); the line to print, or None when nothing changed."""
        if not self.is_deepspeed_enabled:
            return None
        # The accelerator's copy of the config, with transformers' "auto" values filled: what accelerate hands
        # to deepspeed.initialize (the TrainingArguments hold another copy).
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        source = self.args.deepspeed if isinstance(self.args.deepspeed, str) else "(--deepspeed)"
        spread = spread_rates_over_groups(config, groups, self.args, source)
        return describe_spread(config["scheduler"]["type"], spread, groups) if spread else None

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
        """The Trainer's step, counting the batch's real and visual tokens first (for the throughput log)
        and keeping the rates it trains at (for ``lr/<group>``)."""
        self._record_step_rates()
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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss; MoE outputs' ``aux_loss`` (the router loss) is kept for the log."""
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        aux = outputs.get("aux_loss") if isinstance(outputs, dict) else getattr(outputs, "aux_loss", None)
        if torch.is_tensor(aux) and model.training:
            entry = torch.stack([aux.detach().float().reshape(()), torch.ones((), device=aux.device)])
            self._router_aux = entry if self._router_aux is None else self._router_aux + entry.to(self._router_aux)
        return (loss, outputs) if return_outputs else loss

    def _router_aux_log(self) -> dict:
        if self._router_aux is None:
            return {}
        total = self._router_aux
        if self.args.world_size > 1:
            total = self.accelerator.reduce(total.to(self.args.device), reduction="sum")
        self._router_aux = None
        value, count = total.tolist()
        return {"router_aux_loss": round(value / max(count, 1.0), 6)}

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

    def _record_step_rates(self) -> None:
        # Taken as each micro-batch starts: the schedule moves the rates only after the optimizer step, so the
        # last micro-batch's are the ones its step uses.  Under DeepSpeed the engine steps the optimizer and the
        # scheduler together inside the backward, so the rates read after the step (the Trainer's
        # "learning_rate" there, an on_optimizer_step callback) are already the next step's.
        self._step_rates = self._group_learning_rates()
        groups = getattr(self.optimizer, "param_groups", None)
        self._step_first_rate = groups[0]["lr"] if groups else None  # a tensor too (read only when logged)

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
            if self.is_deepspeed_enabled and "learning_rate" in logs and self._step_first_rate is not None:
                # The Trainer read DeepSpeed's rate after the engine's scheduler step (the next step's): the rate
                # this step trained at instead, as the Trainer logs it without DeepSpeed and as lr/<group> is.
                rate = self._step_first_rate
                logs["learning_rate"] = rate.item() if torch.is_tensor(rate) else rate
            logs.update(self._throughput())
            logs.update(self._router_aux_log())
            dataset_metrics = getattr(self.train_dataset, "log_metrics", None)
            if callable(dataset_metrics):
                logs.update(dataset_metrics())
            skip_log = getattr(self.train_dataset, "skip_log", None)
            if skip_log is not None and self.args.world_size > 1:
                logs["skipped_samples"] = self._skipped_over_all_ranks(skip_log.skipped_indices())
        super().log(logs, start_time)

    def _skipped_over_all_ranks(self, mine: set[int]) -> int:
        """Distinct skipped items over every rank: a bad item met by two ranks (in two epochs) counts once."""
        gathered = [None] * self.args.world_size
        # Every rank logs at the same steps (the loss above is gathered too), so this cannot hang.
        torch.distributed.all_gather_object(gathered, sorted(mine))
        return len(set().union(*(set(g) for g in gathered)))

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
        parameters = {name for name, _ in unwrapped.named_parameters(remove_duplicate=False)}
        persistent_buffers = set(unwrapped.state_dict()) - parameters
        if self.args.parallel_mode == ParallelMode.DISTRIBUTED and self.args.process_index != 0 \
                and not persistent_buffers:
            # Loaded before the model is wrapped in DDP, whose constructor copies rank 0's
            # parameters and buffers to every rank: one copy is read instead of one per rank.
            return
        saved = type(unwrapped).from_pretrained(resume_from_checkpoint, dtype=checkpoint_load_dtype(unwrapped))
        unwrapped.load_state_dict(saved.state_dict(), strict=True)
        del saved

    # ---- saving ----

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The Trainer's load, with torch's error for an optimizer state of other trainable parameters
        (a ``--tune_mm_*`` or LoRA flag changed since the checkpoint) turned into a ConfigError with its fix;
        then the restored rates are moved onto this run's schedule at the resumed step (``resume_schedule.py``)."""
        self._load_optimizer_and_scheduler_states(checkpoint)
        # Under DeepSpeed the engine restored both states before this call (no scheduler.pt there).
        if checkpoint is not None and holds_schedule_state(checkpoint):
            self._align_resumed_schedule(checkpoint)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        # transformers refuses a DeepSpeed config whose numbers disagree with the flags by a ValueError deep in
        # deepspeed_init; the usual case is a resume with --max_steps raised and a "scheduler" section whose
        # total_num_steps was written as the old length. Said here with its fix, without the traceback.
        try:
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        except ValueError as err:
            if not self.is_deepspeed_enabled or "DeepSpeed config values that mismatch" not in str(err):
                raise
            lines = [line[2:] for line in str(err).splitlines() if line.startswith("- ds ")]
            raise ConfigError(
                f"the DeepSpeed config {self.args.deepspeed} disagrees with this run's flags:\n  " + "\n  ".join(lines)
                + '\nSet those keys to "auto" in it: transformers then fills them from the flags (for a run '
                "extended with --max_steps or --num_train_epochs, scheduler.params.total_num_steps becomes the new "
                "length). Or change the flags to match.") from None

    def _align_resumed_schedule(self, checkpoint: str) -> None:
        # The restored parameter groups hold the rate the checkpoint's schedule set after its last step
        # (0.0 at the end of a linear run); the first resumed step would train at it.
        change = align_resumed_schedule(self.lr_scheduler, self.state.global_step, self.state.max_steps, checkpoint)
        if change is not None and change.changed and self.is_world_process_zero():
            schedule = str(getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type))
            print(describe_realignment(change, schedule, self.args.get_warmup_steps(self.state.max_steps)),
                  flush=True)

    def _load_optimizer_and_scheduler_states(self, checkpoint: str | None) -> None:
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except ValueError as err:
            if "parameter group" not in str(err):  # torch: "... different number of parameter groups" / "... size"
                raise
            raise ConfigError(
                f"cannot resume the optimizer state of {checkpoint}: it was saved for other trainable parameters "
                f"({err}). --tune_mm_llm, --tune_mm_mlp, --tune_mm_vision or the LoRA flags differ from the run that "
                "wrote it (its flags are in run_args.previous.json in --output_dir). Resume with those flags, or "
                "start a new --output_dir from its weights (a full checkpoint as --model_name_or_path).") from None

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
        _fault_injection_for_tests(output_dir, self.state.global_step)

    def _checkpoint_bytes_estimate(self, run_dir: str) -> int:
        """About what the next checkpoint needs: the newest complete one's size, else weights plus Adam's two states."""
        complete = [f for f in checkpoint_folders(run_dir) if is_complete(f)]
        if complete:
            return folder_bytes(complete[-1])
        model = self.accelerator.unwrap_model(self.model)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return weights + 2 * 4 * trainable

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's save, then the completion marker, then the rotation of old checkpoints.

        A folder of the same step left incomplete by an earlier, killed run is removed first
        (its stale files would otherwise mix with the new ones).  The rotation
        (``--save_total_limit``) runs only after the marker, over complete checkpoints, so
        the previous complete checkpoint is never deleted before the new one is whole.
        """
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        needed = self._checkpoint_bytes_estimate(run_dir)
        if self.args.should_save:
            if os.path.isdir(folder) and not is_complete(folder):
                shutil.rmtree(folder)
            os.makedirs(run_dir, exist_ok=True)
            check_free_space(folder, needed)
        self.accelerator.wait_for_everyone()  # no rank writes into the folder before it is cleared
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotated below, once the new checkpoint is complete
        try:
            super()._save_checkpoint(model, trial)
        except OSError as err:
            if err.errno != errno.ENOSPC or isinstance(err, DiskFullError):
                raise
            free = shutil.disk_usage(run_dir).free
            raise DiskFullError(disk_full_message(folder, needed, free)) from None
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's shards are written
        if self.args.should_save:
            mark_complete(folder, self.state.global_step)
            best = self.state.best_model_checkpoint
            remove_stale_checkpoints(run_dir, limit, {best} if best else set())
        self.accelerator.wait_for_everyone()


def checkpoint_load_dtype(model) -> torch.dtype:
    """The dtype to read a checkpoint in for ``model``: its floating dtype when it has one, else float32.

    Copying into each parameter casts to that parameter's dtype, so reading in the
    dtype every parameter already has gives exactly what reading in float32 would, at
    half the memory for a bf16 model.  Mixed dtypes (fp32 trainable parts next to bf16
    frozen ones, or bf16 next to fp16) read in float32, which holds each of them exactly.
    """
    dtypes = {t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _fault_injection_for_tests(output_dir: str | None, step: int) -> None:
    """SIGKILL this process right after a checkpoint's weights are written (``QWENVL_TEST_KILL_DURING_SAVE=N``
    for the checkpoint of step N, ``final`` for the final model in --output_dir): the deterministic way for a
    test to leave a half-written save behind through the real save path.  Unset, it does nothing."""
    target = os.environ.get("QWENVL_TEST_KILL_DURING_SAVE")
    if not (target and output_dir):
        return
    folder = os.path.basename(os.path.normpath(output_dir))
    if (target == "final" and not folder.startswith("checkpoint-")) \
            or (target.isdigit() and folder == f"checkpoint-{target}" and int(target) == step):
        os.kill(os.getpid(), signal.SIGKILL)


class _ReportShardingMesh(TrainerCallback):
    """Says, once, over which device mesh FSDP2 sharded the model (read from its parameters), so a
    run's log shows whether it trains with full sharding or HSDP, across how many GPUs, and
    whether the shards live in CPU memory (``"cpu_offload": true``)."""

    def __init__(self, trainer: QwenVLTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from .sharding import cpu_offloaded, sharding_mesh

        mesh = sharding_mesh(model) if model is not None else None
        if mesh and state.is_world_process_zero:
            layout = " x ".join(f"{name}={size}" for name, size in mesh.items())
            kind = "HSDP (replicated x sharded)" if len(mesh) > 1 else "full shard"
            offload = ""
            if cpu_offloaded(self.trainer.accelerator.state.fsdp_plugin):
                # The group's backends, as the offloaded gradients' CPU collectives need gloo in it.
                group = torch.distributed.get_backend_config() if torch.distributed.is_initialized() else "none"
                offload = ("; shards, their gradients and the optimizer state in CPU memory, the optimizer "
                           f"steps there (cpu_offload; process group {group})")
            print(f"FSDP2: parameters sharded over a device mesh of {layout}: {kind}{offload}", flush=True)
