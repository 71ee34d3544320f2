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


# ---- pytorch_model.bin and a Hub id from the local cache ----

def _torch_bin(tiny_model_dir, tmp_path, shard_size: str | None = None):
    """The tiny model stored as transformers 4.x wrote it without safetensors: ``torch.save`` of the state dict,
    in shards with a ``pytorch_model.bin.index.json`` when ``shard_size`` is given (transformers 5 no longer
    writes these, it still loads them)."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import AutoConfig

    from qwenvl.tools.make_tiny_model import model_class

    folder = _copy(tiny_model_dir, tmp_path, "bin" if shard_size is None else "bin_sharded")
    (folder / "model.safetensors").unlink()
    source = tiny_model_dir("qwen2_5_vl")
    state = model_class(AutoConfig.from_pretrained(source).model_type).from_pretrained(source).state_dict()
    split = split_torch_state_dict_into_shards(state, filename_pattern="pytorch_model{suffix}.bin",
                                               max_shard_size=shard_size or "100GB")
    for name, tensors in split.filename_to_tensors.items():
        torch.save({key: state[key].contiguous() for key in tensors}, folder / name)
    if split.is_sharded:
        (folder / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": split.metadata, "weight_map": split.tensor_to_filename}))
    return folder, sorted(folder.glob("pytorch_model*.bin"))


def test_pytorch_model_bin_weights_are_checked_as_transformers_would_read_them(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    from qwenvl.tools.make_tiny_model import model_class

    folder, (weights,) = _torch_bin(tiny_model_dir, tmp_path)
    assert model_weights_problems(str(folder)) == []
    model_class(AutoConfig.from_pretrained(folder).model_type).from_pretrained(folder)  # what the check vouches for
    total = _cut(weights, weights.stat().st_size - 100)
    assert model_weights_problems(str(folder)) == [
        (f"{weights} is cut short ({total - 100:,} bytes, its zip directory at the end is missing: an interrupted "
         "download or copy)")]
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 123456\n")
    assert model_weights_problems(str(folder))[0].startswith(f"{weights} is a Git LFS pointer (")
    weights.write_text("<!DOCTYPE html><html><body>rate limited</body></html>")
    assert model_weights_problems(str(folder))[0].startswith(f"{weights} is neither a torch.save zip archive")
    import torch

    torch.save({"w": torch.ones(2)}, weights, _use_new_zipfile_serialization=False)  # torch < 1.6's pickle format
    assert model_weights_problems(str(folder)) == []  # no directory to judge it by: left to its loader


def test_sharded_pytorch_model_bin_names_each_damaged_or_missing_shard(tiny_model_dir, tmp_path):
    folder, shards = _torch_bin(tiny_model_dir, tmp_path, shard_size="5MB")
    assert len(shards) >= 2 and model_weights_problems(str(folder)) == []
    total = _cut(shards[0], shards[0].stat().st_size // 2)
    shards[-1].unlink()
    assert model_weights_problems(str(folder)) == [
        (f"{shards[0]} is cut short ({total // 2:,} bytes, its zip directory at the end is missing: an interrupted "
         "download or copy)"),
        f"{shards[-1]} is missing (named in pytorch_model.bin.index.json)"]


def _hub_cache(model_folder, cache, repo_id="tiny-org/Qwen2.5-VL-tiny", commit="a" * 40):
    """``model_folder`` laid out as huggingface_hub's cache holds a download of ``repo_id``: content-addressed
    ``blobs/``, ``snapshots/<commit>/`` of relative links into them, ``refs/main`` naming the commit."""
    import hashlib
    import os

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in sorted(model_folder.iterdir()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / path.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo_id, snapshot


def test_a_hub_id_is_checked_in_its_cached_snapshot(tiny_model_dir, tmp_path, capsys):
    """A Hub id read from the local cache (no network) was not checked: a shard an interrupted download never
    fetched failed at model load, after the data work and run_args.json."""
    from huggingface_hub import scan_cache_dir

    folder, shards = _sharded(tiny_model_dir, tmp_path)
    cache = tmp_path / "hub"
    repo_id, snapshot = _hub_cache(folder, cache)
    (cached,) = scan_cache_dir(cache).repos  # huggingface_hub reads the layout as its own
    assert cached.repo_id == repo_id and len(cached.revisions) == 1
    assert model_weights_problems(str(snapshot)) == []

    (snapshot / shards[1].name).unlink()  # the download stopped before this shard
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train(_flags(repo_id, out, "--max_steps", "1", "--cache_dir", str(cache)))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (f"error: --model_name_or_path {repo_id} (the Hugging Face cache's {snapshot}): the model's weights are "
            f"damaged:\n  {snapshot / shards[1].name} is missing (named in model.safetensors.index.json)\n"
            f"Fetch it again where the Hub is reachable (`hf download {repo_id}`") in err
    assert "Traceback" not in err and not out.exists()
    # Where the Hub is reachable, from_pretrained fetches what the cache lacks; a damaged cached file stays damaged.
    assert model_weights_problems(str(snapshot), fetchable=True) == []
    total = _cut(snapshot / shards[0].name, 100)
    assert model_weights_problems(str(snapshot), fetchable=True) == [
        (f"{snapshot / shards[0].name} is cut short inside its header (100 bytes; the header alone takes "
         f"{8 + int.from_bytes(shards[0].read_bytes()[:8], 'little'):,})")]
    assert total == shards[0].stat().st_size

    from qwenvl.train.weights_files import snapshot_folder

    assert snapshot_folder(repo_id, str(cache)) == str(snapshot)
    assert snapshot_folder("not-in/the-cache", str(cache)) is None
    assert snapshot_folder(str(tmp_path / "no such folder"), str(cache)) is None  # a mistyped local path
