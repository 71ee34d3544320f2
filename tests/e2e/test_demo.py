"""The README's first command: the demo fine-tune, end to end through scripts/demo.sh."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``bash scripts/demo.sh`` exactly as the README runs it (one run for the module)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    env = dict(os.environ, DEMO_OUTPUT_DIR=str(out), WANDB_MODE="offline")
    run = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run, out


@pytest.mark.slow
def test_demo_script_trains_and_leaves_a_loadable_checkpoint(demo_run):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run, out = demo_run
    found = re.search(r"loss: first ([\d.]+) \(step \d+\), last ([\d.]+)", run.stdout)
    assert found, run.stdout[-2000:]
    first, last = map(float, found.groups())
    assert last < first - 1.0  # clearly below, not noise
    assert (out / "loss_curve.png").stat().st_size > 1000
    for folder in (out, out / "checkpoint-30"):
        processor = AutoProcessor.from_pretrained(folder)
        model = AutoModelForImageTextToText.from_pretrained(folder)
        assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
        assert processor.image_processor.size["longest_edge"] == 112 * 112  # the run's --max_pixels


def _shown(stdout: str) -> dict:
    block = stdout[stdout.index("held-out question"):]
    return dict(re.findall(r"^(held-out question|image|reference answer|before fine-tuning|after fine-tuning)"
                           r"[^:]*:\s*(.*)$", block, flags=re.M))


@pytest.mark.slow
def test_demo_ends_with_a_held_out_question_before_and_after(demo_run):
    run, _ = demo_run
    record = json.loads((REPO / "demo_data" / "shapes_eval.json").read_text())[0]
    shown = _shown(run.stdout)
    assert shown["held-out question"] == record["conversations"][0]["value"].replace("<image>", "").strip()
    assert shown["image"] == f"demo_data/{record['image']}" and (REPO / shown["image"]).is_file()
    assert shown["reference answer"] == record["conversations"][1]["value"]
    assert "before fine-tuning" in shown and "after fine-tuning" in shown


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 12 §6: the demo's 60 CPU steps do not yet learn the held-out "
                                       "answer (measured: empty answers; see the branch dropin-data report)")
def test_demo_answers_the_held_out_question_right_after_fine_tuning(demo_run):
    run, _ = demo_run
    assert _shown(run.stdout)["after fine-tuning"].endswith("(right)")
