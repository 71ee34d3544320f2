"""A damaged base model (a download cut short, a Git LFS pointer, a missing shard) is refused by name before
the data work, not by a SafetensorError traceback after run_args.json is written."""
from __future__ import annotations

import json
import shutil

import pytest

from qwenvl.train.train_qwen import train
from qwenvl.train.weights_files import model_weights_problems, safetensors_problem

from .test_robust_training import _flags


def _copy(tiny_model_dir, tmp_path, name="model"):
    folder = tmp_path / name
    shutil.copytree(tiny_model_dir("qwen2_5_vl"), folder)
    return folder


def _cut(path, keep: int) -> int:
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return len(data)


def _sharded(tiny_model_dir, tmp_path):
    """The tiny model saved in shards (model.safetensors.index.json), as released models are."""
    from transformers import AutoConfig

    from qwenvl.tools.make_tiny_model import model_class

    folder = _copy(tiny_model_dir, tmp_path, "sharded")
    (folder / "model.safetensors").unlink()
    cls = model_class(AutoConfig.from_pretrained(folder).model_type)
    cls.from_pretrained(tiny_model_dir("qwen2_5_vl")).save_pretrained(folder, max_shard_size="100KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and (folder / "model.safetensors.index.json").is_file()
    return folder, shards


def test_a_whole_model_has_no_problems(tiny_model_dir, tmp_path):
    assert model_weights_problems(str(tiny_model_dir("qwen2_5_vl"))) == []
    folder, _ = _sharded(tiny_model_dir, tmp_path)
    assert model_weights_problems(str(folder)) == []


def test_a_weights_file_cut_short_says_how_many_bytes_are_missing(tiny_model_dir, tmp_path):
    weights = _copy(tiny_model_dir, tmp_path) / "model.safetensors"
    total = _cut(weights, (weights.stat().st_size * 2) // 3)
    cut = weights.stat().st_size
    assert safetensors_problem(str(weights)) == (f"is cut short: {cut:,} bytes of the {total:,} its header describes "
                                                 f"({total - cut:,} missing, an interrupted download or copy)")
    _cut(weights, 100)  # inside the header
    assert safetensors_problem(str(weights)).startswith("is cut short inside its header (100 bytes; the header alone")
    _cut(weights, 0)
    assert safetensors_problem(str(weights)) == "is 0 bytes, too short for a safetensors header (empty or cut off at once)"


def test_unreadable_headers_are_named(tiny_model_dir, tmp_path):
    weights = _copy(tiny_model_dir, tmp_path) / "model.safetensors"
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 123456\n")
    assert safetensors_problem(str(weights)).startswith("is a Git LFS pointer (")
    weights.write_text("<!DOCTYPE html><html><body>rate limited</body></html>")
    assert safetensors_problem(str(weights)).startswith("does not start with a safetensors header")
    header = b"{not json}"
    weights.write_bytes(len(header).to_bytes(8, "little") + header)
    assert safetensors_problem(str(weights)).startswith("has a safetensors header that is not valid JSON")


def test_a_header_whose_offsets_do_not_fit_the_tensors_is_caught_by_the_loaders_own_check(tiny_model_dir, tmp_path):
    """Length right, but one tensor's offsets overlap the next: only safetensors' own validation sees it."""
    weights = _copy(tiny_model_dir, tmp_path) / "model.safetensors"
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    name = next(k for k in header if k != "__metadata__" and header[k]["data_offsets"][0] > 0)
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin - 2, end]  # starts inside the previous tensor
    text = json.dumps(header, separators=(",", ":")).encode().ljust(length)  # safetensors pads with spaces too
    assert len(text) == length
    weights.write_bytes(data[:8] + text + data[8 + length:])
    assert safetensors_problem(str(weights)).startswith("cannot be opened by safetensors (")


def test_a_sharded_model_names_each_damaged_or_missing_shard(tiny_model_dir, tmp_path):
    folder, shards = _sharded(tiny_model_dir, tmp_path)
    total = _cut(shards[0], shards[0].stat().st_size - 10)
    shards[-1].unlink()
    problems = model_weights_problems(str(folder))
    assert problems == [
        (f"{shards[0]} is cut short: {total - 10:,} bytes of the {total:,} its header describes (10 missing, an "
         "interrupted download or copy)"),
        f"{shards[-1]} is missing (named in model.safetensors.index.json)"]
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}')
    assert model_weights_problems(str(folder))[0].startswith(
        f"{folder / 'model.safetensors.index.json'} cannot be read as a shard index (JSONDecodeError")


def test_training_from_a_truncated_download_stops_before_anything_is_written(tiny_model_dir, tmp_path, capsys):
    """It was a SafetensorError traceback at model load, after the data work and run_args.json."""
    model = _copy(tiny_model_dir, tmp_path)
    weights = model / "model.safetensors"
    _cut(weights, weights.stat().st_size // 2)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train(_flags(model, out, "--max_steps", "1"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --model_name_or_path {model}: the model's weights are damaged:\n  {weights} is cut short: " in err
    assert "Download the model again" in err and "Traceback" not in err and "SafetensorError" not in err, err
    assert not out.exists()
