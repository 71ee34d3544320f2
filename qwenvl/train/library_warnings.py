"""Known-harmless library warnings that buried the useful lines of a run, silenced in one place.

Each entry says what it is and why it is harmless; nothing else is filtered, and
nothing of ``qwenvl`` is (our own warnings always show).  Called once at start-up by
``train_qwen.train``.

* transformers' "torch.distributed process group is initialized, but parallel_mode !=
  ParallelMode.DISTRIBUTED. In order to use Torch DDP, launch your script with `python
  -m torch.distributed.launch`" (``TrainingArguments`` device setup): DeepSpeed and
  torchrun initialise the process group themselves and the Trainer runs correctly; the
  advice (a launcher deprecated since torch 2.0) does not apply.  Printed on every
  torchrun run, once per rank.
* torch's FutureWarning "`torch.distributed.reduce_scatter_tensor` is deprecated": raised
  from inside DeepSpeed's ZeRO gradient reduction at every bucket, about 680 lines in a
  7-step ``sft_7b.sh`` run; DeepSpeed's call, not ours, and it still works.
* transformers' FutureWarning "`gradient_checkpointing` is deprecated and will be removed in
  v6" (5.2x renamed it ``activation_checkpointing``): ``--gradient_checkpointing`` is the
  official scripts' flag, which this port accepts on purpose; it works until transformers 6.
"""
from __future__ import annotations

import logging
import warnings

TORCH_DISTRIBUTED_LAUNCH_ADVICE = "launch your script with `python -m torch.distributed.launch"
REDUCE_SCATTER_DEPRECATION = r"`torch\.distributed\.reduce_scatter_tensor` is deprecated"
GRADIENT_CHECKPOINTING_RENAME = r"`gradient_checkpointing` is deprecated and will be removed in v6"


class _DropMessages(logging.Filter):
    """Drops log records whose message contains one of the given texts."""

    def __init__(self, *texts: str):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


_installed: list[bool] = []


def quiet_known_library_warnings() -> None:
    """Install the filters above (idempotent)."""
    if _installed:
        return
    logging.getLogger("transformers.training_args").addFilter(_DropMessages(TORCH_DISTRIBUTED_LAUNCH_ADVICE))
    warnings.filterwarnings("ignore", message=REDUCE_SCATTER_DEPRECATION, category=FutureWarning)
    warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_RENAME, category=FutureWarning)
    _installed.append(True)
