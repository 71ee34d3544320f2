"""The README's first command: the demo fine-tune, end to end through scripts/demo.sh."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_script_trains_and_leaves_a_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    env = dict(os.environ, DEMO_OUTPUT_DIR=str(tmp_path / "demo"), WANDB_MODE="offline")
    run = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "--max_steps", "30", "--save_steps", "15"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    found = re.search(r"loss: first ([\d.]+) \(step \d+\), last ([\d.]+)", run.stdout)
    assert found, run.stdout[-2000:]
    first, last = map(float, found.groups())
    assert last < first - 1.0  # clearly below, not noise
    out = tmp_path / "demo"
    assert (out / "loss_curve.png").stat().st_size > 1000
    for folder in (out, out / "checkpoint-15"):
        processor = AutoProcessor.from_pretrained(folder)
        model = AutoModelForImageTextToText.from_pretrained(folder)
        assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
        assert processor.image_processor.size["longest_edge"] == 112 * 112  # the run's --max_pixels
