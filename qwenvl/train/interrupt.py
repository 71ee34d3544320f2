"""Ctrl-C (SIGINT) and SIGTERM end a run at the next optimizer step, with a checkpoint.

Without this, Ctrl-C raises ``KeyboardInterrupt`` wherever Python happens to be
(inside a forward, a collective, a half-written checkpoint) and nothing is saved.
``StopOnSignal`` turns the first signal into a flag; at the end of the step the
Trainer is told to save (``control.should_save``, unless ``--save_strategy no``) and
stop (``control.should_training_stop``).  A second signal stops at once, as usual.

Under torchrun every rank gets the signal (the terminal sends it to the whole
process group; torchrun forwards it, then kills what is still running after its
shutdown timeout: 30 s unless ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` / ``--shutdown_timeout``
says more, which a large model's save needs; a save cut off there is never taken for a
complete checkpoint), but not necessarily during the same step: the ranks agree on it
with one tiny all-reduce per step, so they all save and stop at the same step
(a rank that stopped alone would leave the others waiting in a collective).
Dataloader workers forked after the handler is installed inherit it, so a
Ctrl-C does not kill them under the step that is finishing.
"""
from __future__ import annotations

import signal
import sys
import time

import torch
from transformers import TrainerCallback

HANDLED = (signal.SIGINT, signal.SIGTERM)
# A terminal's Ctrl-C reaches a torchrun worker twice: from the terminal (the whole process
# group) and again from torchrun, which forwards what it got.  Signals this close to the
# first are taken as that same one; a later one means "stop now".
SAME_SIGNAL_WINDOW_S = 2.0


class StopOnSignal(TrainerCallback):
    """Save and stop at the end of the step in which SIGINT / SIGTERM arrived (see the module doc)."""

    def __init__(self):
        self.signal_name: str | None = None
        self.stopped_at: int | None = None  # the step the run stopped at because of a signal
        self.saved: bool = False
        self._previous = {}
        self._first_at = 0.0

    # ---- signal handling ----

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.signal_name is not None:
            if now - self._first_at < SAME_SIGNAL_WINDOW_S:
                return  # the same Ctrl-C, forwarded once more by torchrun
            self.uninstall()  # a second Ctrl-C: stop now, the default way
            raise KeyboardInterrupt
        self._first_at = now
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name} received: finishing this step, then saving a checkpoint and stopping "
              "(send it again to stop at once without saving).", file=sys.stderr, flush=True)

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    # ---- Trainer events ----

    def on_train_begin(self, args, state, control, **kwargs):
        self.install()

    def on_train_end(self, args, state, control, **kwargs):
        self.uninstall()

    def on_step_end(self, args, state, control, **kwargs):
        if not self._any_rank_signalled(args):
            return
        self.stopped_at = state.global_step
        control.should_training_stop = True
        if str(getattr(args.save_strategy, "value", args.save_strategy)) != "no":
            control.should_save = True
            self.saved = True

    def _any_rank_signalled(self, args) -> bool:
        flag = self.signal_name is not None
        if args.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return flag
        # Every rank reaches every step end, so this collective cannot hang.
        # "nccl", or "cuda:nccl,cpu:gloo" under FSDP2's CPU offload: the flag goes through NCCL on the GPU.
        device = args.device if "nccl" in str(torch.distributed.get_backend()) else torch.device("cpu")
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        if value.item() and self.signal_name is None:
            self.signal_name = "a signal on another rank"
        return bool(value.item())

    def report(self, output_dir: str) -> str:
        """What happened, for the user: where the checkpoint is, or that none was due."""
        step = self.stopped_at
        if self.saved:
            return (f"stopped by {self.signal_name} after step {step}: checkpoint saved in "
                    f"{output_dir}/checkpoint-{step}; run the same command again to resume from it.")
        return (f"stopped by {self.signal_name} after step {step}: no checkpoint saved (--save_strategy no); "
                "the final model was not written.")
