"""train_qwen.py --help: this port's flags first under headings, transformers' TrainingArguments last."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import transformers

from qwenvl.train.help import INHERITED, help_sections

REPO = Path(__file__).resolve().parents[2]


def _help() -> str:
    result = subprocess.run([sys.executable, "-m", "qwenvl.train.train_qwen", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_groups_our_flags_first_and_keeps_every_flag():
    from qwenvl.data.arguments import DataArguments
    from qwenvl.train.arguments import ModelArguments, TrainingArguments

    text = _help()
    headings = [line[:-1] for line in text.splitlines() if re.match(r"^[A-Za-z].*:$", line)]
    assert headings[:3] == ["Options", ModelArguments.help_heading, DataArguments.help_heading]
    assert headings[-1] == INHERITED and "Learning rates and LoRA" in headings

    def position(flag):
        return text.index(f"\n  --{flag} ")

    inherited_start = text.index(INHERITED)
    for ours in ("model_name_or_path", "tune_mm_llm", "dataset_use", "max_pixels", "mm_projector_lr", "lora_r",
                 "model_max_length", "loss_kernel", "optim", "warmup_ratio"):
        assert position(ours) < inherited_start, ours
    for theirs in ("per_device_train_batch_size", "learning_rate", "save_steps", "deepspeed", "report_to"):
        assert position(theirs) > inherited_start, theirs
    # every flag of the three dataclasses is on the page exactly once
    for dtype in (ModelArguments, DataArguments, TrainingArguments):
        for field in dtype.__dataclass_fields__.values():
            if field.init:
                assert text.count(f"\n  --{field.name} ") == 1, field.name
    assert "usage: train_qwen.py [RUN.json | RUN.yaml] [--flag value ...]" in text.splitlines()[:2]


def test_every_own_training_flag_has_a_heading_above_transformers():
    from qwenvl.data.arguments import DataArguments
    from qwenvl.train.arguments import ModelArguments, TrainingArguments

    sections = help_sections((ModelArguments, DataArguments, TrainingArguments))
    inherited = dict(sections)[INHERITED]
    base = {f.name for f in transformers.TrainingArguments.__dataclass_fields__.values()}
    assert set(inherited) <= base
    assert "mm_projector_lr" not in inherited and "online_packing" not in inherited
