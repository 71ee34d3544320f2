"""The demo's last lines: the held-out questions asked before and after fine-tuning."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from qwenvl.tools.demo_answer import DemoAnswer, HeldOut, main, pick_shown, training_prior

REPO = Path(__file__).resolve().parents[2]


def _records(name: str) -> list[dict]:
    return json.loads((REPO / "demo_data" / name).read_text())


def test_asks_every_held_out_record_to_both_checkpoints(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the dictionary's paths are relative to the repository
    tiny = str(tiny_model_dir("qwen2_5_vl"))
    held = main(["--before", tiny, "--after", tiny, "--dataset", "demo_colour_eval", "--index", "1"])
    records = _records("colour_eval.json")
    record = records[1]
    question = record["conversations"][0]["value"].replace("<image>", "").strip()
    assert held.shown == 1 and len(held.answers) == len(records)
    answer = held.answers[1]
    assert answer.question == question and answer.reference == record["conversations"][1]["value"]
    assert answer.media == [f"demo_data/{record['image']}"]
    assert [a.reference for a in held.answers] == [r["conversations"][1]["value"] for r in records]
    # the same weights and pixels give the same greedy answer
    assert all(a.before == a.after for a in held.answers)
    assert held.prior is None  # a model folder, not a training run: no training data to count
    out = capsys.readouterr().out
    printed = out[out.index("held-out question"):].splitlines()  # libraries may log before it
    assert printed[0] == f"held-out question (demo_colour_eval, record 1): {question}"
    assert printed[1] == f"image: demo_data/{record['image']}"
    assert printed[3].startswith("before fine-tuning:")
    assert printed[4].startswith("after fine-tuning:") and printed[4].endswith("(right)" if answer.right else "(wrong)")
    n = len(records)
    assert printed[5] == (f"all {n} held-out records of demo_colour_eval: {held.right_before}/{n} right before "
                          f"fine-tuning, {held.right_after}/{n} after")
    assert [line.split("'")[1] for line in printed[6:]] == ["blue", "green", "red"]


def test_training_prior_counts_the_runs_training_records(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    (run / "checkpoint-5").mkdir(parents=True)
    (run / "run_args.json").write_text(json.dumps({"dataset_use": "demo_colour,demo_shapes%50,demo_text",
                                                   "dataset_dictionary": "dataset_dictionary.json"}))
    question = "What colour is the shape?"
    expected = Counter(r["conversations"][1]["value"] for name in ("colour.json", "shapes.json")
                       for r in _records(name) if r["conversations"][0]["value"].endswith(question))
    (answer, count), = expected.most_common(1)
    assert training_prior(run, question) == (answer, count, sum(expected.values()))
    assert training_prior(run / "checkpoint-5", question) == training_prior(run, question)
    assert training_prior(run, "Which way does the square move?") is None  # demo_video is not in the run
    assert training_prior(tmp_path, question) is None  # no run_args.json


def test_shown_record_defaults_to_one_the_prior_cannot_answer():
    answers = [DemoAnswer("q", [], ref, "", ref) for ref in ("Red", "red", "blue", "red")]
    assert pick_shown(answers, lambda q: ("red", 5, 9)) == 2
    assert pick_shown(answers, lambda q: None) == 0  # no prior known: the first record
    assert pick_shown(answers[:2], lambda q: ("red", 5, 9)) == 0  # every one is the prior: the first
    held = HeldOut("d", answers, shown=2, prior=("red", 5, 9))
    assert (held.right_before, held.right_after) == (0, 4)
    assert list(held.by_reference) == ["Red", "red", "blue"]


def test_right_ignores_case_and_surrounding_space():
    assert DemoAnswer("q", [], "green", "", " Green\n").right
    assert not DemoAnswer("q", [], "green", "", "").right
