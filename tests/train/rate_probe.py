"""Run ``train_qwen`` with a trainer that prints the learning rates each step trains at, for the tests.

    python -m tests.train.rate_probe --deepspeed ... (the flags of train_qwen)

It reads the optimizer's parameter groups as each step begins (what that step's optimizer step uses),
independently of what the trainer logs, and prints ``RATE <step> <lr>`` (the first group) and
``GROUP_RATES <step> <json>`` (every group, by name), ``GROUP_DECAY <step> <json>`` (their weight decays) and,
after the step, ``LOSS <step> <loss>`` (the step's training loss at full precision; the log rounds it).
Under DeepSpeed the Trainer's own logged rate is read after the engine's scheduler step, the next step's,
so a wrong rate on the first resumed step never showed in ``trainer_state.json``.
"""
from __future__ import annotations

import json
import sys

from qwenvl.train.trainer import QwenVLTrainer


class RateProbeTrainer(QwenVLTrainer):
    def training_step(self, model, inputs, *args, **kwargs):
        if self.is_world_process_zero():
            groups = self.optimizer.param_groups
            step = self.state.global_step + 1
            print(f"RATE {step} {groups[0]['lr']!r}", flush=True)
            names = [g.get("name", str(i)) for i, g in enumerate(groups)]
            print(f"GROUP_RATES {step} {json.dumps({n: float(g['lr']) for n, g in zip(names, groups)})}", flush=True)
            print(f"GROUP_DECAY {step} {json.dumps({n: float(g['weight_decay']) for n, g in zip(names, groups)})}",
                  flush=True)
            if step == 1:
                inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper
                inner = getattr(inner, "optimizer", inner)  # DeepSpeed's ZeRO wrapper
                print(f"OPTIMIZER {type(inner).__module__}.{type(inner).__name__} "
                      f"{json.dumps({k: v for k, v in inner.defaults.items() if k in ('betas', 'eps')})}", flush=True)
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.is_world_process_zero():
            print(f"LOSS {self.state.global_step + 1} {loss.item()!r}", flush=True)
        return loss


def group_rates(stdout: str, what: str = "GROUP_RATES") -> dict[int, dict[str, float]]:
    """``{step: {group name: rate}}`` from a probe run's output (the last line per step wins); with
    ``what="GROUP_DECAY"``, each group's weight decay instead; with ``what="LOSS"``, ``{step: loss}``."""
    rates = {}
    for line in stdout.splitlines():
        if line.startswith(what + " "):
            _, step, payload = line.split(" ", 2)
            rates[int(step)] = json.loads(payload)
    return rates


if __name__ == "__main__":
    from qwenvl.train.train_qwen import train

    train(sys.argv[1:], trainer_class=RateProbeTrainer)
