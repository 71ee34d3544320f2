"""Record-format problems stop ``train_qwen`` before the model loads; TRL layouts train through it."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from qwenvl.train.train_qwen import train

PIXELS = ["--max_pixels", str(56 * 56), "--min_pixels", str(28 * 28)]


def _flags(model_dir, out, dictionary, use, *extra):
    return ["--model_name_or_path", str(model_dir), "--dataset_dictionary", str(dictionary), "--dataset_use", use,
            "--output_dir", str(out), "--tune_mm_llm", "True", "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-3", "--report_to", "none", "--use_cpu", "True", "--model_max_length", "512",
            "--dataloader_num_workers", "0", "--disable_tqdm", "True", "--save_strategy", "no", *PIXELS, *extra]


@pytest.fixture
def weightless_model(tiny_model_dir, tmp_path):
    """A tiny Qwen2.5-VL checkpoint whose weights file is whole but holds every tensor with one element: loading
    the model fails (a shape mismatch), so a run that ends with a data error proves the model was never loaded.
    (A whole file rather than an absent, empty or cut one: those are refused before the data work themselves.)"""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = tmp_path / "weightless"
    shutil.copytree(tiny_model_dir("qwen2_5_vl"), folder)
    for weights in folder.glob("*.safetensors"):
        with safe_open(str(weights), framework="pt") as f:
            names, metadata = list(f.keys()), f.metadata()
        save_file({name: torch.zeros(1) for name in names}, str(weights), metadata=metadata)
    return folder


def _good(i):
    return {"conversations": [{"from": "human", "value": f"What is {i} + 1?"}, {"from": "gpt", "value": str(i + 1)}]}


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_unknown_layout_stops_before_the_model_loads(weightless_model, tmp_path, capsys, policy):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(_good(i)) + "\n" for i in range(20)))
    bad = tmp_path / "alpaca.json"  # a layout this package does not read, in every record
    bad.write_text(json.dumps([{"instruction": f"Add {i} and 1", "output": str(i + 1)} for i in range(20)]))
    dictionary = tmp_path / "dict.json"
    dictionary.write_text(json.dumps({"good": {"annotation_path": str(good)}, "alpaca": {"annotation_path": str(bad)}}))
    with pytest.raises(SystemExit) as exit_info:
        train(_flags(weightless_model, tmp_path / "out", dictionary, "good,alpaca", "--bad_sample_policy", policy))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "data error: checked before loading the model" in err
    assert f"dataset 'alpaca', file {bad}, record 0" in err and "(and 7 more of its first 8 records)" in err
    assert "'prompt' + 'completion' (TRL)" in err  # the layouts it does read
    assert "good.jsonl" not in err and "Traceback" not in err and "safetensors" not in err


def test_one_bad_record_stops_an_error_run_but_not_a_skip_run_at_start(weightless_model, tmp_path, capsys):
    records = [_good(i) for i in range(20)]
    records[3] = {"conversations": [{"from": "human", "value": "only a question"}]}
    path = tmp_path / "mostly_good.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    dictionary = tmp_path / "dict.json"
    dictionary.write_text(json.dumps({"mine": {"annotation_path": str(path)}}))
    with pytest.raises(SystemExit) as exit_info:
        train(_flags(weightless_model, tmp_path / "out", dictionary, "mine"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"file {path}, record 3: no assistant turn" in err and "safetensors" not in err
    # With --bad_sample_policy skip the record is left to the run's skipping: the check passes
    # and the run goes on to load the model (here: fails there, which a data check never would).
    with pytest.raises(Exception) as load_failure:
        train(_flags(weightless_model, tmp_path / "out2", dictionary, "mine", "--bad_sample_policy", "skip"))
    assert "ignore_mismatched_sizes" in str(load_failure.value)  # transformers' shape check: the model did load


def test_trl_prompt_completion_saved_to_disk_trains(tiny_model_dir, tmp_path, capsys):
    import datasets

    rows = {"prompt": [], "completion": [], "images": []}
    for i in range(8):
        colour = ["red", "green"][i % 2]
        rows["prompt"].append([{"role": "user", "content": [{"type": "image"},
                                                            {"type": "text", "text": "What colour is it?"}]}])
        rows["completion"].append([{"role": "assistant", "content": [{"type": "text", "text": colour}]}])
        rows["images"].append([Image.new("RGB", (56, 56), (220, 20, 20) if colour == "red" else (20, 200, 20))])
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "trl"))
    dictionary = tmp_path / "dict.json"
    dictionary.write_text(json.dumps({"trl": {"annotation_path": str(tmp_path / "trl")}}))
    out = train(_flags(tiny_model_dir("qwen2_5_vl"), tmp_path / "out", dictionary, "trl", "--max_steps", "2",
                       "--logging_steps", "1"))
    printed = capsys.readouterr().out
    assert "loss: first" in printed and (tmp_path / "out" / "config.json").is_file() and out == str(tmp_path / "out")
