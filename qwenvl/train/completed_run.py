"""Recognise a finished run being started again with the same command.

A run resumes from the newest ``checkpoint-*`` of its ``--output_dir`` (as the official
code).  When that run had already finished, the Trainer would still take one more step
before it notices that ``global_step`` reached ``max_steps`` (it checks after a step,
not before the first), so every re-run added ``checkpoint-31``, ``checkpoint-32``, ...
past the end of the schedule and overwrote the saved model.

A run is finished when ``trainer_state.json`` sits in the output folder itself (written
only after training ends) with ``global_step >= max_steps``.  It is the same command when
the flags saved in ``run_args.json`` equal this run's.  Then nothing is loaded or
written.  A changed command (say a larger ``--max_steps``) resumes as before.
"""
from __future__ import annotations

import json
import os


def _as_saved(values: dict) -> dict:
    return json.loads(json.dumps(values, default=str))


def completed_run_message(output_dir: str, saved_args: dict) -> str | None:
    """The line to print when ``output_dir`` holds a finished run of exactly these flags, else None.

    ``saved_args`` is what this run would write to ``run_args.json``.
    """
    state_path = os.path.join(output_dir, "trainer_state.json")
    args_path = os.path.join(output_dir, "run_args.json")
    try:
        with open(state_path) as f:
            state = json.load(f)
        with open(args_path) as f:
            previous = json.load(f)
    except (OSError, ValueError):  # no finished run here (or files we cannot read): train as usual
        return None
    step, max_steps = int(state.get("global_step") or 0), int(state.get("max_steps") or 0)
    if previous != _as_saved(saved_args) or not 0 < max_steps <= step:
        return None
    # The same judgement a resume makes (checkpoints.py): a folder a killed save left behind, or one damaged
    # since, is not named as the one to resume from.
    from .checkpoints import newest_complete_checkpoint

    checkpoint, passed_over = newest_complete_checkpoint(output_dir)
    longer = (f"raise --max_steps or --num_train_epochs (it resumes from {os.path.basename(checkpoint)})"
              if checkpoint else
              f"pass --model_name_or_path {output_dir} with a new --output_dir (no complete checkpoint-* to resume "
              "from)")
    skipped = "".join(f" {os.path.basename(item.path)} is not resumable ({item.why})." for item in passed_over)
    return (f"the run in {output_dir} is already complete (step {step} of {max_steps}, trainer_state.json): "
            f"nothing was changed. To train longer, {longer}; to start again, choose a new --output_dir.{skipped}")


def checkpoint_step(checkpoint: str) -> int | None:
    """``global_step`` of a checkpoint's ``trainer_state.json`` (None when unreadable)."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            return int(json.load(f).get("global_step"))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def resumed_past_max_steps(checkpoint: str, output_dir: str, max_steps: int) -> str | None:
    """When ``checkpoint`` already reached ``--max_steps``: the line to print if ``output_dir`` holds the
    finished run's model, else a ConfigError. None when there are steps left to train.

    The Trainer checks ``max_steps`` only after a step, so resuming at (or past) it trains one more
    step, saves ``checkpoint-<N+1>`` and overwrites the final model: a re-run of a finished run
    with any flag changed (``--logging_steps``), or with ``--max_steps`` lowered, did that.
    """
    from .arguments import ConfigError

    step = checkpoint_step(checkpoint)
    if max_steps is None or max_steps <= 0 or step is None or step < max_steps:
        return None
    final = checkpoint_step(output_dir)
    reached = "reaches" if step == max_steps else "is past"
    if final is not None and final >= min(step, max_steps):
        return (f"the run in {output_dir} is already complete: its newest checkpoint {checkpoint} (step {step}) "
                f"{reached} --max_steps {max_steps}, and the final model (step {final}) is saved there. Nothing was "
                "changed. To train longer, raise --max_steps above "
                f"{step}; to start again, choose a new --output_dir.")
    raise ConfigError(f"{checkpoint} is at step {step}, which {reached} --max_steps {max_steps}: resuming would "
                      f"train step {step + 1} anyway and save it as the result. Raise --max_steps above {step} to "
                      "train further; the checkpoint itself loads as the model of that step (with its processor).")


def refuse_retraining_a_finished_run(output_dir: str, overwrite: bool) -> None:
    """ConfigError when ``output_dir`` holds a finished run's model but no checkpoint to resume from.

    Without a checkpoint (``--save_strategy no``, or checkpoints deleted to save space), a changed
    command (``--max_steps`` raised to train longer) would start again from ``--model_name_or_path``
    and overwrite the finished model.  ``--overwrite_output_dir True`` says that is intended.
    """
    from .arguments import ConfigError

    step = checkpoint_step(output_dir)
    if overwrite or not step:
        return
    raise ConfigError(f"--output_dir {output_dir} holds a finished run's model (step {step}) but no checkpoint-* to "
                      "resume from: this run would train again from --model_name_or_path and overwrite that model. "
                      f"To train it further, pass --model_name_or_path {output_dir} with a new --output_dir; to "
                      "replace it, pass --overwrite_output_dir True.")
