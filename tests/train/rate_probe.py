"""Run ``train_qwen`` with a trainer that prints the learning rate each step trains at, for the tests.

    python -m tests.train.rate_probe --deepspeed ... (the flags of train_qwen)

The Trainer logs ``get_last_lr()`` after a step's scheduler step, i.e. the rate of the *next* step, so a
wrong rate on the first resumed step never shows in ``trainer_state.json``; this reads the optimizer's
first parameter group as the step begins (what the optimizer step uses) and prints ``RATE <step> <lr>``.
"""
from __future__ import annotations

import sys

from qwenvl.train.trainer import QwenVLTrainer


class RateProbeTrainer(QwenVLTrainer):
    def training_step(self, model, inputs, *args, **kwargs):
        if self.is_world_process_zero():
            print(f"RATE {self.state.global_step + 1} {self.optimizer.param_groups[0]['lr']!r}", flush=True)
        return super().training_step(model, inputs, *args, **kwargs)


if __name__ == "__main__":
    from qwenvl.train.train_qwen import train

    train(sys.argv[1:], trainer_class=RateProbeTrainer)
