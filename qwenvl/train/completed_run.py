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
    return (f"the run in {output_dir} is already complete (step {step} of {max_steps}, trainer_state.json): "
            "nothing was changed. To train longer, raise --max_steps or --num_train_epochs (it resumes from the "
            "newest checkpoint); to start again, choose a new --output_dir.")
