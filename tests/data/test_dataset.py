"""The dataset module end to end: dictionary -> mixture -> rendered batches -> model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText

from qwenvl.data.arguments import DataArguments
from qwenvl.data.dataset import make_supervised_data_module
from qwenvl.data.errors import DataError
from qwenvl.data.preview import preview
from qwenvl.data.skips import Skipped
from tests.conftest import load_processor

REPO = Path(__file__).resolve().parents[2]
MIX = {"demo_shapes": 10, "demo_text": 20, "demo_multi_image": 10, "demo_grounding": 5}


@pytest.fixture(scope="module")
def qwen25(tiny_model_dir):
    path = tiny_model_dir("qwen2_5_vl")
    return path, load_processor(path), AutoConfig.from_pretrained(path)


def _args(**kw):
    kw.setdefault("dataset_use", ",".join(f"{k}%{v}" for k, v in MIX.items()))
    return DataArguments(max_pixels=112 * 112, min_pixels=56 * 56, **kw)


def test_demo_mixture_renders_and_trains_one_step(qwen25):
    path, processor, config = qwen25
    module = make_supervised_data_module(processor, _args(), config, model_max_length=512, seed=7)
    dataset = module["train_dataset"]
    lengths = {k: v["length"] for k, v in json.loads((REPO / "dataset_dictionary.json").read_text()).items()}
    assert len(dataset) == sum(round(lengths[k] * v / 100) for k, v in MIX.items())
    # The flags are written into the processor that checkpoints will carry.
    assert processor.image_processor.size["longest_edge"] == 112 * 112

    again = make_supervised_data_module(processor, _args(), config, model_max_length=512, seed=7)["train_dataset"]
    other = make_supervised_data_module(processor, _args(), config, model_max_length=512, seed=8)["train_dataset"]
    assert (dataset.mixture == again.mixture).all()
    assert not (dataset.mixture == other.mixture).all()

    batch = module["data_collator"]([dataset[i] for i in range(0, len(dataset), 5)])
    model = AutoModelForImageTextToText.from_pretrained(path)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()


def _bad_dictionary(tmp_path: Path) -> Path:
    Image.new("RGB", (56, 56), (1, 2, 3)).save(tmp_path / "ok.png")
    records = [
        {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                              {"from": "gpt", "value": "dark"}]},
        {"image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                   {"from": "gpt", "value": "dark"}]},
    ]
    (tmp_path / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    dictionary = tmp_path / "dictionary.json"
    dictionary.write_text(json.dumps({"bad": {"annotation_path": "bad.jsonl", "data_path": ".", "length": 2}}))
    return dictionary


def test_bad_sample_error_names_the_record(qwen25, tmp_path):
    _, processor, config = qwen25
    args = _args(dataset_use="bad", dataset_dictionary=str(_bad_dictionary(tmp_path)))
    dataset = make_supervised_data_module(processor, args, config, seed=0)["train_dataset"]
    bad = [i for i in range(len(dataset)) if int(dataset.mixture[i][1]) == 1][0]
    with pytest.raises(DataError, match=r"missing\.png") as err:
        dataset[bad]
    assert "record 1" in str(err.value) or "bad.jsonl" in str(err.value)


def test_bad_sample_skip_is_logged_once_and_dropped(qwen25, tmp_path):
    _, processor, config = qwen25
    args = _args(dataset_use="bad", dataset_dictionary=str(_bad_dictionary(tmp_path)), bad_sample_policy="skip")
    module = make_supervised_data_module(processor, args, config, seed=0, output_dir=str(tmp_path / "out"))
    dataset = module["train_dataset"]
    items = [dataset[i] for i in range(len(dataset))] + [dataset[i] for i in range(len(dataset))]
    assert sum(isinstance(item, Skipped) for item in items) == 2
    batch = module["data_collator"](items)
    assert batch["input_ids"].shape[0] == 2  # the good record, twice
    lines = (tmp_path / "out" / "skipped_samples.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "missing.png" in json.loads(lines[0])["reason"]
    assert sum(dataset.skip_log.counts.values()) == 2
    assert dataset.log_metrics() == {"skipped_samples": 1}  # what the training logs report


def test_preview_shows_trained_spans_and_json(qwen25):
    path, _, _ = qwen25
    text = preview(["--dataset_use", "demo_shapes", "--model_name_or_path", str(path), "--index", "0",
                    "--max_pixels", str(112 * 112), "--min_pixels", str(56 * 56)])
    assert "[[" in text and "<|im_end|>]]" in text and "<|image_pad|>x" in text
    assert "image_grid_thw" in text
    data = json.loads(preview(["--dataset_use", "demo_shapes", "--model_name_or_path", str(path), "--json"]))
    assert len(data["input_ids"]) == len(data["labels"]) == len(data["position_ids"][0])
    assert len(data["position_ids"]) == 3 and data["image_grid_thw"]


def test_preview_shows_the_thinking_mode_of_each_qwen3_5_sample(tiny_model_dir, tmp_path):
    record = {"messages": [{"role": "user", "content": "a?"},
                           {"role": "assistant", "content": "A", "reasoning_content": "first"},
                           {"role": "user", "content": "b?"}, {"role": "assistant", "content": "B"}]}
    (tmp_path / "r.json").write_text(json.dumps([record]))
    (tmp_path / "dict.json").write_text(json.dumps({"r": {"annotation_path": str(tmp_path / "r.json")}}))
    args = ["--dataset_use", "r", "--dataset_dictionary", str(tmp_path / "dict.json"),
            "--model_name_or_path", str(tiny_model_dir("qwen3_5"))]
    text = preview(args)
    assert "--enable_thinking auto; the record trains as 2 samples, one per reasoning turn" in text
    assert text.index("mode: thinking (the think block is trained)") < \
        text.index("mode: non-thinking (the empty think block is prompt)")
    assert "[[first\n</think>\n\nA<|im_end|>]]" in text and "</think>\n\n[[B<|im_end|>]]" in text
    off = preview(args + ["--enable_thinking", "false"])
    assert "--enable_thinking false" in off and "mode: thinking" not in off and "first" not in off
