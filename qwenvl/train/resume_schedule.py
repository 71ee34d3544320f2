"""The learning-rate schedule of a resumed run: this run's shape, from the resumed step on.

A resume restores two things that fix the learning rate, and they disagree when the run's
length changed (``--max_steps`` or ``--num_train_epochs`` raised to extend a run, a different
dataset size, another ``--warmup_ratio`` or ``--lr_scheduler_type``):

- the optimizer's parameter groups carry the rate the *checkpoint's* schedule set after its
  last step (torch's ``Optimizer.load_state_dict``): 0.0 at the end of a finished linear run;
- the scheduler keeps this run's functions of the step (transformers builds them for the new
  total; ``LambdaLR.load_state_dict`` restores only their ``__dict__``, empty for the
  ``functools.partial`` transformers uses) and the checkpoint's step count and base rates.

The Trainer then trains the first resumed step at the restored, stale rate, and only the
scheduler's first ``step()`` moves to the new schedule: an extended linear run trained its
first new step at 0.0, then jumped.  ``align_resumed_schedule`` asks the scheduler for its
rate at the resumed step before any step is taken, so every step trains at

    base rate (the checkpoint's, per parameter group) x this run's schedule factor at that step

which is the rate a run planned from the start with these flags would use at that step.
The base rates stay the checkpoint's, as the optimizer state's other hyperparameters do
(``output_dir.OPTIMIZER_STATE_FLAGS``: a changed ``--learning_rate`` is not applied on resume).

A schedule from the DeepSpeed config's ``"scheduler"`` section (``WarmupLR``, ``WarmupDecayLR``,
``WarmupCosineLR``, ...) has the same flaw: its state is only ``last_batch_iteration``, its
parameters (``total_num_steps``, the rates) come from this run's config, which transformers fills
from this run's flags where they are ``"auto"`` and refuses at the start where a number disagrees
with them; the optimizer's groups again hold the checkpoint's last rate.  Measured (ZeRO-2, CPU):
a 4-step ``WarmupDecayLR`` run extended to 8 trained step 5 at 5e-4, a run planned for 8 steps at
8.33e-4.  Such a schedule is recomputed at its restored ``last_batch_iteration``, which gives this
run's rate at that step, base rates from the config (``warmup_max_lr``) as its later steps use: one
per parameter group where the per-group rates differ (``deepspeed_schedule.py`` wrote them as lists
before DeepSpeed built the schedule, on resume too), so each group resumes on its own rate.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from torch.optim.lr_scheduler import LambdaLR


@dataclass(frozen=True)
class ScheduleRealignment:
    """What a resume did to the learning rate: the step it resumes at, the checkpoint's planned
    total and this run's, and the first group's rate as restored and as this run's schedule sets it."""

    step: int
    planned_steps: int | None
    total_steps: int
    restored_lr: float
    lr: float
    deepspeed_schedule: str | None = None  # the class of a schedule from the DeepSpeed config, else None

    @property
    def changed(self) -> bool:
        """True when the schedule differs from the checkpoint's: another length, or another rate at this step."""
        other_length = self.planned_steps is not None and self.planned_steps != self.total_steps
        return other_length or not math.isclose(self.restored_lr, self.lr, rel_tol=1e-6, abs_tol=1e-12)


def planned_steps(checkpoint: str) -> int | None:
    """The ``max_steps`` the run that wrote ``checkpoint`` was planned for (its ``trainer_state.json``), or None."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            return int(json.load(f)["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def holds_schedule_state(checkpoint: str) -> bool:
    """Whether ``checkpoint`` carries a scheduler state: ``scheduler.pt``, or a DeepSpeed engine folder
    (``global_step*``, which holds it).  A ``--save_only_model`` checkpoint has none: its run starts the
    schedule again from its first step (``checkpoints.py`` warns so), and that is left as it is."""
    try:
        names = os.listdir(checkpoint)
    except OSError:
        return False
    return "scheduler.pt" in names or any(name.startswith("global_step") for name in names)


def align_resumed_schedule(scheduler, step: int, total_steps: int, checkpoint: str) -> ScheduleRealignment | None:
    """Set every parameter group's rate to what ``scheduler`` (restored from ``checkpoint``) gives at ``step``.

    Call after the optimizer and scheduler states are loaded and before the first resumed step.
    Only ``LambdaLR`` schedulers (every transformers schedule but ``reduce_lr_on_plateau`` and
    ``greedy``, whose rates follow the losses seen and are restored as they were) are recomputed;
    None for the others.
    """
    scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps the real one
    if _is_deepspeed_schedule(scheduler):
        return _align_deepspeed_schedule(scheduler, step, total_steps, checkpoint)
    if not isinstance(scheduler, LambdaLR):
        return None
    groups = scheduler.optimizer.param_groups
    restored = float(groups[0]["lr"])
    # The scheduler's own step computes base_lr x factor(last_epoch) into every group (and its
    # get_last_lr, which the Trainer logs); stepping back one first makes it land on the resumed step.
    scheduler.last_epoch = step - 1
    scheduler.step()
    return ScheduleRealignment(step=step, planned_steps=planned_steps(checkpoint), total_steps=total_steps,
                               restored_lr=restored, lr=float(groups[0]["lr"]))


def _is_deepspeed_schedule(scheduler) -> bool:
    # deepspeed.runtime.lr_schedules: each computes its rate from last_batch_iteration and its config's parameters.
    return type(scheduler).__module__ == "deepspeed.runtime.lr_schedules" and \
        isinstance(getattr(scheduler, "last_batch_iteration", None), int)


def _align_deepspeed_schedule(scheduler, step: int, total_steps: int, checkpoint: str) -> ScheduleRealignment | None:
    if scheduler.last_batch_iteration < 0:
        return None  # not stepped yet: the rate it set at its start is already its own
    groups = scheduler.optimizer.param_groups
    restored = float(groups[0]["lr"])
    # step(i) sets i as the last batch and writes the rate for it into every group (and get_last_lr):
    # the restored index again, now with this run's parameters.
    scheduler.step(scheduler.last_batch_iteration)
    return ScheduleRealignment(step=step, planned_steps=planned_steps(checkpoint),
                               total_steps=int(getattr(scheduler, "total_num_steps", total_steps)),
                               restored_lr=restored, lr=float(groups[0]["lr"]),
                               deepspeed_schedule=type(scheduler).__name__)


def describe_realignment(change: ScheduleRealignment, schedule_type: str, warmup_steps: int) -> str:
    """The line a resumed run prints once when its schedule differs from the checkpoint's."""
    planned = (f"a run planned for {change.planned_steps} steps, now {change.total_steps}"
               if change.planned_steps is not None and change.planned_steps != change.total_steps
               else f"a run of {change.total_steps} steps")
    warmup = f" with {warmup_steps} warmup steps" if warmup_steps else ""
    if change.deepspeed_schedule:
        return (f"resuming step {change.step} of {planned}: the DeepSpeed config's {change.deepspeed_schedule} "
                f"schedule (its \"scheduler\" section) is recomputed at its saved position with this run's "
                f"parameters; step {change.step + 1} trains at lr {change.lr:.6g} (the checkpoint's optimizer held "
                f"{change.restored_lr:.6g}), as a run planned with this config would.")
    if schedule_type == "constant" or (schedule_type == "constant_with_warmup" and change.step >= warmup_steps):
        shape = f"the {schedule_type} schedule keeps its rate"
    else:
        shape = f"the {schedule_type} schedule is recomputed over {change.total_steps} steps{warmup}"
    return (f"resuming step {change.step} of {planned}: {shape}; step {change.step + 1} trains at lr "
            f"{change.lr:.6g} (the checkpoint's optimizer held {change.restored_lr:.6g}), each parameter group at "
            "its saved base rate times this schedule's factor.")
