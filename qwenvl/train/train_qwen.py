"""Supervised fine-tuning entry point of Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense and MoE).

    python -m qwenvl.train.train_qwen --model_name_or_path DIR --dataset_use demo \\
        --tune_mm_llm True --tune_mm_mlp True --output_dir out
    torchrun --nproc_per_node 8 qwenvl/train/train_qwen.py ...   (or scripts/launch.sh)
    python -m qwenvl.train.train_qwen run.yaml [--flag value ...]

Order of work: parse and check every flag (and that ``--output_dir`` is new, empty or
ours); read the processor and config; build the data and its batch sampler (so data
problems show before the model loads, and before anything is written); check the
checkpoint to resume from (whole, of this model and kind, a LoRA one with the same rank,
alpha and targets, steps left to train); take the folder's lock (one run at a time,
run_lock.py) and write ``run_args.json`` (saying which flags changed since the run
that wrote the folder); load the model with the class its config names; freeze / LoRA;
train, resuming from the newest complete ``checkpoint-*`` in ``--output_dir`` if there
is one (as the official code); Ctrl-C saves a checkpoint and
stops (exit 130); save the model and processor, then ``trainer_state.json`` (which marks
the run finished); on the main process print where they are, the first and last loss, and write
``loss_curve.png``.  Argument and data problems end the run with their message and
a non-zero exit status, without a traceback.
"""
from __future__ import annotations

import json
import os
import re
import sys

from qwenvl.data.errors import DataError
from qwenvl.hf_internals import attn_implementation, require_transformers_internals
from qwenvl.train.arguments import ConfigError, explicit_args_for_saving, parse_args
from qwenvl.train.checkpoints import DiskFullError, check_checkpoint_fits, resume_point
from qwenvl.train.completed_run import (completed_run_message, refuse_retraining_a_finished_run,
                                        resumed_past_max_steps)
from qwenvl.train.length_cache import require_length_cache
from qwenvl.train.library_warnings import quiet_known_library_warnings
from qwenvl.train.lora_resume import check_lora_resume
from qwenvl.train.output_dir import check_output_dir, describe_changes, write_run_args
from qwenvl.train.run_lock import lock_output_dir, release_output_dir_locks
from qwenvl.train.secret_flags import redact_secrets_in_argv
from qwenvl.train.stack_dumps import enable_stack_dumps
from qwenvl.train.wandb_mode import configure_wandb

INTERRUPTED = 130  # the shell's status for a run ended by Ctrl-C


def _main_process(training_args) -> bool:
    return training_args.process_index == 0


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*: ")


def _clean_message(err: BaseException) -> str:
    """The error's own message, without a dataloader worker's traceback wrapped around it."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    lines = text.split("Original Traceback", 1)[1].splitlines()
    # The traceback ends with "package.module.ErrorClass: message" (the message may span lines).
    starts = [i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line)]
    if not starts:
        return text
    return _EXCEPTION_LINE.sub("", "\n".join(lines[starts[-1]:]), count=1)


def write_loss_curve(log_history: list[dict], path: str) -> bool:
    """Plot training (and eval) loss against the step into ``path``; False when nothing was logged."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train and not evals:
        return False
    # The object API with the Agg canvas: no pyplot, no global backend switch, no display needed.
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # an optional extra (pip install matplotlib); the run itself is saved already
        return False

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", marker="." if len(train) < 50 else None)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def _summary(trainer, output_dir: str, lora: bool) -> str:
    history = trainer.state.log_history
    losses = [(e["step"], e["loss"]) for e in history if "loss" in e]
    lines = []
    if lora:
        lines.append(f"LoRA adapter and processor saved in {output_dir}; merge into a plain model with:\n"
                     f"  python -m qwenvl.tools.merge_lora --checkpoint {output_dir} --output {output_dir}-merged")
    else:
        lines.append(f"model and processor saved in {output_dir} "
                     "(loads with AutoModelForImageTextToText / AutoProcessor)")
    if losses:
        (s0, l0), (s1, l1) = losses[0], losses[-1]
        lines.append(f"loss: first {l0:.4f} (step {s0}), last {l1:.4f} (step {s1})")
    curve = os.path.join(output_dir, "loss_curve.png")
    if write_loss_curve(history, curve):
        lines.append(f"loss curve: {curve}")
    return "\n".join(lines)


def _train(argv, trainer_class=None):
    import transformers

    from qwenvl.data.dataset import make_supervised_data_module
    from qwenvl.train.model import (check_model_dir, check_model_weights, load_model, model_class_for,
                                    parameter_table, prepare_model, read_config, read_processor)
    from qwenvl.train.steps import build_trainer, train_batch_sampler
    from qwenvl.train.zero3_experts import check_zero3_expert_layout

    model_args, data_args, training_args, explicit = parse_args(argv)
    redact_secrets_in_argv()
    main = _main_process(training_args)
    transformers.set_seed(training_args.seed)
    output_dir = training_args.output_dir
    saved_args = explicit_args_for_saving(explicit)
    finished = completed_run_message(output_dir, saved_args)
    if finished:  # re-running a finished command changes nothing
        if main:
            print(finished, flush=True)
        return output_dir
    # Only the main process judges the folder: the others would see its run_args.json being written.
    previous_args = check_output_dir(output_dir, training_args.overwrite_output_dir) if main else None
    wandb_lines = configure_wandb(training_args.report_to, output_dir)  # environment only, writes nothing

    path = model_args.model_name_or_path
    check_model_dir(path)  # an adapter folder, no config.json, no weights: named before any data work
    config = read_config(path, training_args.cache_dir)
    model_class_for(config.model_type)  # an unsupported family fails here, before any data work
    check_zero3_expert_layout(path, config, training_args.cache_dir)  # qwen3_vl_moe experts ZeRO-3 cannot load
    check_model_weights(path, training_args.cache_dir)
    if training_args.lora_enable:  # expert weights named by --lora_target_parameters: judged on a weightless model
        from qwenvl.train.lora_experts import check_target_parameters

        check_target_parameters(config, training_args.lora_target_parameters)
    require_transformers_internals(config.model_type, error=ConfigError)  # what we rely on is still there
    processor = read_processor(path, training_args.cache_dir)
    data_module = make_supervised_data_module(
        processor, data_args, model_config=config, model_max_length=training_args.model_max_length,
        seed=training_args.seed, output_dir=output_dir)
    batch_sampler = train_batch_sampler(data_module["train_dataset"], training_args, check_cache=lambda dataset: (
        require_length_cache(dataset, explicit, path, training_args.model_max_length, training_args.world_size)))

    # The flags and the data passed their checks: from here on the folder is this run's.
    checkpoint, notes = resume_point(training_args.resume_from_checkpoint, output_dir)
    lora_checked = True
    if not checkpoint:
        refuse_retraining_a_finished_run(output_dir, training_args.overwrite_output_dir)
    else:
        check_checkpoint_fits(checkpoint, config, training_args.lora_enable, path)
        lora_checked = check_lora_resume(checkpoint, config, model_args, training_args)  # rank, alpha, targets
        done = resumed_past_max_steps(checkpoint, output_dir, training_args.max_steps)
        if done:  # nothing left to train; the Trainer would take one more step
            if main:
                print(done, flush=True)
            return output_dir
    if main:
        for line in wandb_lines:
            print(line, flush=True)
        if previous_args is not None:
            changes = describe_changes(previous_args, json.loads(json.dumps(saved_args, default=str)), checkpoint)
            if changes:
                print(changes, file=sys.stderr, flush=True)
        for note in notes:
            print(note, file=sys.stderr, flush=True)
        lock_output_dir(output_dir)  # one run at a time in the folder, until this process ends
        write_run_args(output_dir, saved_args, previous_args)

    model = load_model(model_args, training_args)
    if checkpoint and not lora_checked:  # under ZeRO-3 the LoRA targets resolve only on the loaded model
        check_lora_resume(checkpoint, config, model_args, training_args, model=model)
    model = prepare_model(model, model_args, training_args)
    from qwenvl.train.linear_attention import check_flattening_supported, check_linear_attention_trainable

    flattened = bool(data_args.data_flatten or data_args.data_packing)
    if flattened:
        check_flattening_supported(model)  # never a silent leak between packed samples
    check_linear_attention_trainable(model, flattened)  # fla's backward on this GPU (Hopper + Triton < 3.7.1)
    if main:
        print(f"{type(model).__name__} from {path} (model_type {config.model_type}, "
              f"attention {attn_implementation(model.config)})\n{parameter_table(model)}", flush=True)

    trainer = build_trainer(model, training_args, processor, data_module, batch_sampler, trainer_class=trainer_class)
    if checkpoint and main:
        print(f"resuming from {checkpoint}", flush=True)
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        trainer.stop_on_signal.uninstall()  # also when training raised: Ctrl-C means "stop" again
    if trainer.stop_on_signal.stopped_at is not None:
        # A stopped run is not a finished one: no final model, only the checkpoint to resume from.
        if main:
            print(trainer.stop_on_signal.report(output_dir), file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED)
    trainer.save_model(output_dir)  # with the processor, and use_cache=True in the saved config
    # trainer_state.json last: it is what marks the run finished (completed_run.py), so a run killed
    # while writing the final model is never taken for a finished one.
    trainer.save_state()
    if main:
        print(_summary(trainer, output_dir, training_args.lora_enable), flush=True)
    return output_dir


def default_allocator_settings(environ=os.environ) -> None:
    """Let PyTorch's CUDA allocator grow segments (``expandable_segments:True``) unless the
    user configured it.  Packed batches change shape every step; with fixed-size segments
    the freed blocks fragment, and on the H100 a 16k-token run stopped with "10.9 GiB
    reserved but unallocated" out of memory.  Read at the first CUDA allocation, so this
    runs before the model loads."""
    if not (environ.get("PYTORCH_CUDA_ALLOC_CONF") or environ.get("PYTORCH_ALLOC_CONF")):
        environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def train(argv: list[str] | None = None, trainer_class=None) -> str:
    """Run one training from flags (``sys.argv`` when ``argv`` is None); returns the output directory.

    ``trainer_class``: a subclass of ``QwenVLTrainer`` to train with (default: that class).

    Exits with status 2 on argument problems, 1 on data problems and a full disk,
    printing only their message, and 130 when Ctrl-C / SIGTERM stopped the run.
    """
    default_allocator_settings()
    quiet_known_library_warnings()
    enable_stack_dumps()  # kill -USR1 <pid>: where a stuck run waits, without stopping it
    try:
        output_dir = _train(argv, trainer_class)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except DataError as err:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}data error: {_clean_message(err)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except DiskFullError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        # Ctrl-C before training started (or a second one during it): nothing half-done is kept as done.
        print("\ninterrupted: stopped before a checkpoint could be saved; complete checkpoints in "
              "--output_dir are kept and the same command resumes from the newest.", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED) from None
    finally:
        release_output_dir_locks()  # train() may run again in this process (tests, notebooks)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from qwenvl.train.sharding import finish_distributed

        finish_distributed()  # every rank leaves together (a lone rank's exit can hang the others)
    return output_dir


if __name__ == "__main__":
    train()
