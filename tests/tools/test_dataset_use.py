"""python -m qwenvl.tools.dataset_use leaves evaluation splits out of the training string."""
from __future__ import annotations

import json

import pytest

from qwenvl.tools import dataset_use


@pytest.mark.parametrize("name, is_eval", [("demo_shapes_eval", True), ("coco-val", True), ("vqa_VALIDATION", True),
                                           ("docs_test", True), ("textvqa_valid", True), ("medical", False),
                                           ("evaluation_notes", False), ("interval", False), ("latest", False)])
def test_eval_split_names(name, is_eval):
    assert dataset_use.is_eval_split(name) is is_eval


def test_eval_splits_are_left_out_and_named(tmp_path, capsys):
    for name in ("train.jsonl", "eval.jsonl"):
        (tmp_path / name).write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "yo"}]}) + "\n")
    (tmp_path / "dict.json").write_text(json.dumps({
        "shapes": {"annotation_path": "train.jsonl", "repeat_time": 2.0},
        "shapes_eval": {"annotation_path": "eval.jsonl"},
        "text": {"annotation_path": "train.jsonl", "sampling_rate": 0.5}}))
    assert dataset_use.main(["--dataset_dictionary", str(tmp_path / "dict.json")]) == 0
    captured = capsys.readouterr()
    assert captured.out == "shapes%200,text%50\n"  # stdout stays the one line to paste
    assert "left out as evaluation splits: shapes_eval" in captured.err
    assert "--eval_dataset_use shapes_eval" in captured.err
