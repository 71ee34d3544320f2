"""An invalid flag value in the data tools (preview, audit) ends in a clean message and exit 2, not a
traceback (training already reported these cleanly)."""
from __future__ import annotations

import pytest

from qwenvl.data import preview
from qwenvl.tools import audit

BAD = ["--dataset_use", "demo", "--bad_sample_policy", "skipp", "--media_timeout", "0"]


def _exit_status(main, argv) -> int:
    try:
        return main(argv)  # an exception escaping here is the traceback the user saw
    except SystemExit as done:
        return done.code


@pytest.mark.parametrize("main, extra", [(audit.main, []), (preview.main, ["--model_name_or_path", "unused"])])
def test_an_invalid_flag_value_is_a_message_not_a_traceback(main, extra, capsys):
    assert _exit_status(main, BAD + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "--bad_sample_policy must be 'error' or 'skip', not 'skipp'" in err
    assert "--media_timeout must be a positive number of seconds" in err  # every problem, at once


@pytest.mark.parametrize("main, required", [
    (audit.main, []), (preview.main, ["--model_name_or_path", "unused"]),
    ("pack_data", ["--model_name_or_path", "unused", "--model_max_length", "512", "--output", "unused"])])
def test_an_unknown_flag_is_a_message_and_exit_2(main, required, capsys):
    """audit ended in HfArgumentParser's ValueError traceback with exit 1 (the README promises 2)."""
    from qwenvl.tools import pack_data

    main = pack_data.main if main == "pack_data" else main
    assert _exit_status(main, ["--dataset_use", "demo", *required, "--bogus", "1"]) == 2
    err = capsys.readouterr().err
    assert "--bogus" in err and "Traceback" not in err


def test_preview_of_a_bad_sample_names_the_problem_instead_of_hanging_or_crashing(tmp_path, tiny_model_dir, capsys,
                                                                                  monkeypatch):
    import json
    import os

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))
    os.mkfifo(tmp_path / "cat.png")  # reading it would block forever
    (tmp_path / "a.jsonl").write_text(json.dumps({"image": "cat.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}) + "\n")
    (tmp_path / "dict.json").write_text(json.dumps({"d": {"annotation_path": "a.jsonl", "data_path": "."}}))
    argv = ["--dataset_use", "d", "--dataset_dictionary", str(tmp_path / "dict.json"),
            "--model_name_or_path", str(tiny_model_dir("qwen2_5_vl")), "--bad_sample_policy", "skip"]
    assert _exit_status(preview.main, argv) == 2  # with skip, the item was None: a TypeError before
    err = capsys.readouterr().err
    assert "record 0" in err and "cat.png is not a regular file" in err


@pytest.mark.parametrize("main", [audit.main, preview.main, "pack_data"])
@pytest.mark.parametrize("keep, message", [
    (["model.safetensors", "tokenizer.json", "tokenizer_config.json", "processor_config.json"],
     "is a LoRA adapter (adapter_config.json, no config.json), not a full model"),
    (["config.json", "model.safetensors"], "cannot load the processor of --model_name_or_path"),
])
def test_an_unusable_model_folder_is_a_message_not_a_traceback(main, keep, message, tiny_model_dir, tmp_path,
                                                               capsys):
    """A LoRA adapter folder or one without the processor files: transformers' OSError / ValueError traceback."""
    import shutil

    from qwenvl.tools import pack_data

    model = tmp_path / "model"
    model.mkdir()
    for name in keep:
        shutil.copy(tiny_model_dir("qwen2_5_vl") / name, model / name)
    if "config.json" not in keep:
        (model / "adapter_config.json").write_text('{"base_model_name_or_path": "/models/base"}')
    argv = ["--dataset_use", "demo_text%2", "--model_name_or_path", str(model)]
    if main == "pack_data":
        main, argv = pack_data.main, argv + ["--model_max_length", "512", "--output", str(tmp_path / "packs.json")]
    assert _exit_status(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"--model_name_or_path {model}" in err and message in err, err
