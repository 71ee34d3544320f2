"""When the datasets of ``--eval_dataset_use`` are evaluated if ``--eval_strategy`` does not say.

Naming evaluation datasets means you want them evaluated, but the Trainer's default
``--eval_strategy no`` (which the official scripts also pass) would skip them without a
word.  So with ``--eval_dataset_use`` and ``--eval_strategy no`` this port evaluates:

* at the save steps (``--save_strategy steps``: every ``--save_steps``), so each saved
  checkpoint has its eval loss next to it;
* once per epoch otherwise (``--save_strategy epoch``, ``no`` or ``best``): the Trainer
  evaluates at the end of every epoch, and at the end of a run cut short by
  ``--max_steps``.

One line says which.  To train without evaluating, leave ``--eval_dataset_use`` out; to
choose the schedule, pass ``--eval_strategy steps --eval_steps N`` (or ``epoch``).
"""
from __future__ import annotations


def _name(value) -> str:
    return str(getattr(value, "value", value))


def schedule_evaluation(values: dict) -> list[str]:
    """Set ``eval_strategy`` (and ``eval_steps``) in the raw flag values when eval datasets are
    named but no schedule is; returns the line that says what was chosen (or nothing)."""
    if not values.get("eval_dataset_use") or _name(values.get("eval_strategy", "no")) != "no":
        return []
    datasets = values["eval_dataset_use"]
    if _name(values.get("save_strategy", "steps")) == "steps":
        values["eval_strategy"] = "steps"
        values["eval_steps"] = values.get("save_steps") or 500
        when = f"every {values['eval_steps']:g} steps (the save steps)"
    else:
        values["eval_strategy"] = "epoch"
        when = "at the end of every epoch"
    return [f"--eval_dataset_use {datasets} without --eval_strategy: evaluating {when}. "
            "Pass --eval_strategy steps --eval_steps N to choose, or leave out --eval_dataset_use to skip it."]
