"""qwenvl.tools.evaluate: prompts and references, scoring, teacher-forced loss, table and JSON."""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from qwenvl.data.catalog.formats import Conversation
from qwenvl.data.errors import DataError
from qwenvl.data.render.prompt import split_last_reply
from qwenvl.tools import chat, evaluate
from qwenvl.tools.chat import Reply


@pytest.mark.parametrize("answer, reference, same", [
    ("The red.", "red", True),
    ("  An apple ", "apple", True),
    ("Red!", "red", True),
    ("a red  square", "Red square.", True),
    ("blue", "red", False),
    ("theme", "me", False),  # articles only as whole words
    ("12", "1 2", False),
])
def test_normalise(answer, reference, same):
    assert (evaluate.normalise(answer) == evaluate.normalise(reference)) is same


def _text(t):
    return {"type": "text", "text": t}


def test_prompt_is_everything_before_the_last_reply():
    conversation = Conversation(messages=[
        {"role": "system", "content": [_text("Be brief.")]},
        {"role": "user", "content": [_text("What is 2 + 3?")]},
        {"role": "assistant", "content": [_text("5")]},
        {"role": "user", "content": [_text("Now add 1.")]},
        {"role": "assistant", "content": [_text("6")]},
    ], origin="test")
    prompt, reference = split_last_reply(conversation)
    assert reference == "6"
    assert [m["role"] for m in prompt.messages] == ["system", "user", "assistant", "user"]
    with pytest.raises(DataError, match="no assistant turn"):
        split_last_reply(Conversation(messages=conversation.messages[:2], origin="test"))


@pytest.fixture
def eval_data(tmp_path):
    """Two small datasets (image colour questions, text arithmetic) in a dictionary of their own."""
    for name, colour in (("red", (220, 30, 30)), ("blue", (40, 70, 220))):
        Image.new("RGB", (56, 56), colour).save(tmp_path / f"{name}.png")
    images = [{"image": f"{c}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": c}]}
        for c in ("red", "blue", "red", "blue")]
    text = [{"conversations": [{"from": "human", "value": "What is 2 + 3?"}, {"from": "gpt", "value": "5"},
                               {"from": "human", "value": "Now add 1."}, {"from": "gpt", "value": "6"}]},
            {"conversations": [{"from": "human", "value": "What is 1 + 1?"}, {"from": "gpt", "value": "2"}]}]
    (tmp_path / "images.json").write_text(json.dumps(images))
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text))
    dictionary = tmp_path / "dictionary.json"
    dictionary.write_text(json.dumps({"colours": {"annotation_path": "images.json", "data_path": "."},
                                      "sums": {"annotation_path": "text.jsonl"}}))
    return dictionary


def test_scores_table_and_json(tiny_model_dir, eval_data, tmp_path, monkeypatch, capsys):
    """Scripted answers: exact and normalised counts, the prompts asked, the table and the JSON."""
    scripted = {"red": ["red", "The red."], "blue": ["blue", "green"], "6": ["6"], "2": ["two"]}
    asked = []

    def fake_generate(model, processor, renderer, prompt, max_new_tokens=128, thinking=None):
        asked.append(prompt)
        # The prompt never holds the reference: it ends with the user's question.
        assert prompt.messages[-1]["role"] == "user"
        inputs = renderer.encode(prompt, add_generation_prompt=True, thinking=thinking)  # and it renders
        assert inputs["input_ids"].shape[1] > 0
        reference = fake_generate.references.pop(0)
        return Reply(text=scripted[reference].pop(0), token_ids=[0], stopped_at_end=True)

    fake_generate.references = ["red", "blue", "red", "blue", "6", "2"]
    monkeypatch.setattr(chat, "generate", fake_generate)
    output = tmp_path / "out" / "scores.json"
    results = evaluate.main(["--model", str(tiny_model_dir("qwen2_5_vl")), "--dataset_use", "colours,sums",
                             "--dataset_dictionary", str(eval_data), "--output", str(output),
                             "--max_pixels", str(56 * 56), "--min_pixels", str(56 * 56)])
    rows = {r["dataset"]: r for r in results["datasets"]}
    assert rows["colours"]["samples"] == 4
    assert rows["colours"]["exact_count"] == 2 and rows["colours"]["normalised_count"] == 3
    assert rows["sums"]["exact_count"] == 1 and rows["sums"]["normalised_count"] == 1
    assert rows["all"]["samples"] == 6 and rows["all"]["exact"] == pytest.approx(3 / 6)
    # An untrained model over the real 152k vocabulary: loss near ln(151936) = 11.93.
    for row in rows.values():
        assert abs(row["loss"] - math.log(151936)) < 1.0
    # The multi-turn sample was asked its last question with its history.
    assert [m["role"] for m in asked[4].messages] == ["user", "assistant", "user"]

    saved = json.loads(output.read_text())
    assert saved["datasets"] == results["datasets"]
    assert [p["prediction"] for p in saved["predictions"]] == ["red", "blue", "The red.", "green", "6", "two"]
    assert saved["data_settings"]["max_pixels"] == 56 * 56
    table = capsys.readouterr().out
    assert "dataset" in table and "normalised" in table and "colours" in table and "75.0%" in table


def test_loss_is_the_models_own_cross_entropy(tiny_model_dir, eval_data):
    """sample_loss (sum, count) agrees with the model's mean loss on the collated sample."""
    from qwenvl.data.batch.collate import PaddedCollator
    from qwenvl.data.catalog.registry import load_dictionary, parse_dataset_use
    from qwenvl.data.dataset import SupervisedDataset

    model, processor = chat.load_checkpoint(tiny_model_dir("qwen2_5_vl"), device="cpu")
    renderer = chat.make_renderer(model, processor, chat.chat_data_args(processor, max_pixels=56 * 56,
                                                                        min_pixels=56 * 56))
    dataset = SupervisedDataset(parse_dataset_use("colours,sums", load_dictionary(str(eval_data))), renderer, 0)
    collator = PaddedCollator(processor.tokenizer.pad_token_id)
    for i in (0, 4):  # an image sample and the two-turn text sample
        sample = dataset[i]
        total, tokens = evaluate.sample_loss(model, sample, collator)
        assert tokens == int((sample["labels"] != -100).sum())
        with torch.no_grad():
            reference = model(**collator([sample]), use_cache=False).loss
        assert total / tokens == pytest.approx(float(reference), rel=1e-5)


def test_real_generation_with_limit(tiny_model_dir, eval_data, tmp_path):
    results = evaluate.main(["--model", str(tiny_model_dir("qwen2_5_vl")), "--dataset_use", "sums",
                             "--dataset_dictionary", str(eval_data), "--limit", "1", "--max_new_tokens", "2",
                             "--output", str(tmp_path / "e.json")])
    assert results["datasets"][0]["samples"] == 1 and len(results["datasets"]) == 1
    prediction = results["predictions"][0]
    assert isinstance(prediction["prediction"], str) and prediction["reference"] == "6"


def test_unknown_dataset_is_a_data_error(tiny_model_dir, eval_data, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", str(tiny_model_dir("qwen2_5_vl")), "--dataset_use", "colour",
                       "--dataset_dictionary", str(eval_data)])
    assert exit_info.value.code == 1
    assert "colours" in capsys.readouterr().err  # did-you-mean
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", str(tiny_model_dir("qwen2_5_vl"))])
    assert exit_info.value.code == 2


def test_table_format():
    table = evaluate.format_table([{"dataset": "d", "samples": 2, "exact": 0.5, "normalised": 1.0, "loss": 0.25},
                                   {"dataset": "empty", "samples": 0, "exact": None, "normalised": None,
                                    "loss": None}])
    lines = table.splitlines()
    assert lines[0].split() == ["dataset", "samples", "exact", "normalised", "loss"]
    assert lines[1].split() == ["d", "2", "50.0%", "100.0%", "0.2500"]
    assert lines[2].split() == ["empty", "0", "-", "-", "-"]


def test_default_output_is_beside_the_checkpoint_not_in_it_with_progress(tiny_model_dir, eval_data, tmp_path,
                                                                          capsys):
    """Without --output the JSON goes to <run folder>/eval/<checkpoint>_<datasets>.json (a checkpoint folder is
    a model to load or rotate away), the path is printed, and each dataset gets a progress bar."""
    import shutil

    checkpoint = tmp_path / "run" / "checkpoint-4"
    shutil.copytree(tiny_model_dir("qwen2_5_vl"), checkpoint)
    before = sorted(p.name for p in checkpoint.iterdir())
    evaluate.main(["--model", str(checkpoint), "--dataset_use", "colours", "--dataset_dictionary", str(eval_data),
                   "--limit", "1", "--max_new_tokens", "1", "--max_pixels", str(56 * 56), "--min_pixels",
                   str(56 * 56)])
    captured = capsys.readouterr()
    expected = tmp_path / "run" / "eval" / "checkpoint-4_colours.json"
    assert json.loads(expected.read_text())["datasets"][0]["samples"] == 1
    assert f"written to {expected}" in captured.out
    assert sorted(p.name for p in checkpoint.iterdir()) == before  # nothing written into the checkpoint
    assert "colours: 100%" in captured.err and "1/1" in captured.err  # tqdm's bar, on stderr
