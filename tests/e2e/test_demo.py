"""The README's first command: the demo fine-tune, end to end through scripts/demo.sh."""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest

from tests.commands import run_command
from tests.conftest import load_processor

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``bash scripts/demo.sh`` exactly as the README runs it (one run for the module)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    env = dict(os.environ, DEMO_OUTPUT_DIR=str(out), WANDB_MODE="offline")
    run = run_command(["bash", str(REPO / "scripts" / "demo.sh")], env=env, timeout=1100)  # < pytest-timeout
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    print(run.stdout[run.stdout.find("loss: first"):])  # what the user sees at the end (pytest -s)
    return run, out


@pytest.mark.slow
def test_demo_script_trains_and_leaves_a_loadable_checkpoint(demo_run):
    from transformers import AutoModelForImageTextToText

    run, out = demo_run
    found = re.search(r"loss: first ([\d.]+) \(step \d+\), last ([\d.]+)", run.stdout)
    assert found, run.stdout[-2000:]
    first, last = map(float, found.groups())
    assert last < first - 1.0  # clearly below, not noise
    assert (out / "loss_curve.png").stat().st_size > 1000
    for folder in (out, out / "checkpoint-40"):
        processor = load_processor(folder)
        model = AutoModelForImageTextToText.from_pretrained(folder)
        assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
        assert processor.image_processor.size["longest_edge"] == 112 * 112  # the run's --max_pixels


def _shown(stdout: str) -> dict:
    block = stdout[stdout.index("held-out question"):]
    return dict(re.findall(r"^(held-out question|image|reference answer|most common training answer|before fine-tuning"
                           r"|after fine-tuning)[^:]*:\s*(.*)$", block, flags=re.M))


def _training_answers(question: str) -> Counter:
    """Answers to ``question`` in the demo's training datasets (scripts/demo.sh's DATASETS), each record once."""
    datasets = re.search(r'DATASETS="\$\{DATASETS:-([^}]*)\}"', (REPO / "scripts" / "demo.sh").read_text())[1]
    dictionary = json.loads((REPO / "dataset_dictionary.json").read_text())
    answers = Counter()
    for name in datasets.split(","):
        text = (REPO / dictionary[name]["annotation_path"]).read_text()
        records = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines()]
        for r in records:
            turns = r["conversations"]
            if turns[-2]["value"].replace("<image>", "").strip() == question:
                answers[turns[-1]["value"]] += 1
    return answers


@pytest.mark.slow
def test_demo_ends_with_a_held_out_question_before_and_after(demo_run):
    run, _ = demo_run
    shown = _shown(run.stdout)
    dataset, index = re.search(r"^held-out question \((\w+), record (\d+)\):", run.stdout, flags=re.M).groups()
    assert dataset == "demo_colour_eval"
    record = json.loads((REPO / "demo_data" / "colour_eval.json").read_text())[int(index)]
    question = record["conversations"][0]["value"].replace("<image>", "").strip()
    assert shown["held-out question"].endswith(question)
    assert shown["image"] == f"demo_data/{record['image']}" and (REPO / shown["image"]).is_file()
    assert shown["reference answer"] == record["conversations"][1]["value"]
    assert "before fine-tuning" in shown and "after fine-tuning" in shown
    # The shown question's right answer is not the one training gave most often for it,
    # so answering it right is not the answer prior.
    (prior, count), = _training_answers(question).most_common(1)
    assert shown["most common training answer"].startswith(f"{prior!r} ({count} of ")
    assert shown["reference answer"] != prior


@pytest.mark.slow
def test_demo_answers_held_out_questions_right_after_fine_tuning(demo_run):
    """The shown answer is right, and so are most of the 12 held-out records, every colour.

    Chance is 1/3 per record (balanced colours); a constant answer gets 4/12. Needing
    >= 10/12 with every colour right at least 3 of 4 times: P(>= 10 of 12 by chance) ~ 5e-4.
    """
    run, _ = demo_run
    assert _shown(run.stdout)["after fine-tuning"].endswith("(right)")
    total = re.search(r"^all (\d+) held-out records of demo_colour_eval: (\d+)/\d+ right before fine-tuning, "
                      r"(\d+)/\d+ after$", run.stdout, flags=re.M)
    assert total, run.stdout[-2000:]
    n, before, after = map(int, total.groups())
    assert n == 12 and after >= 10, total[0]
    assert before <= 4, total[0]  # random weights: nowhere near the fine-tuned score
    per_colour = re.findall(r"^  reference '(\w+)': (\d+)/(\d+) right after", run.stdout, flags=re.M)
    assert sorted(c for c, _, _ in per_colour) == ["blue", "green", "red"], per_colour
    assert all(int(k) >= 3 and int(m) == 4 for _, k, m in per_colour), per_colour
