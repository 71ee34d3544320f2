"""The demo's last lines: one held-out question asked before and after fine-tuning."""
from __future__ import annotations

import json
from pathlib import Path

from qwenvl.tools.demo_answer import DemoAnswer, main

REPO = Path(__file__).resolve().parents[2]


def test_asks_the_held_out_record_to_both_checkpoints(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the dictionary's paths are relative to the repository
    tiny = str(tiny_model_dir("qwen2_5_vl"))
    answer = main(["--before", tiny, "--after", tiny, "--dataset", "demo_shapes_eval", "--index", "1"])
    record = json.loads((REPO / "demo_data" / "shapes_eval.json").read_text())[1]
    question = record["conversations"][0]["value"].replace("<image>", "").strip()
    assert answer.question == question and answer.reference == record["conversations"][1]["value"]
    assert answer.media == [f"demo_data/{record['image']}"]
    assert answer.before == answer.after  # the same weights and pixels give the same greedy answer
    out = capsys.readouterr().out
    printed = out[out.index("held-out question"):].splitlines()  # libraries may log before it
    assert printed[0] == f"held-out question (demo_shapes_eval, record 1): {question}"
    assert printed[1] == f"image: demo_data/{record['image']}"
    assert printed[-1].startswith("after fine-tuning:") and printed[-1].endswith("(right)" if answer.right else "(wrong)")


def test_right_ignores_case_and_surrounding_space():
    assert DemoAnswer("q", [], "green", "", " Green\n").right
    assert not DemoAnswer("q", [], "green", "", "").right
