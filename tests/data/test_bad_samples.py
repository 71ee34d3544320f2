"""One rule for bad samples, shared by training's --bad_sample_policy, the length cache and the audit:
each silently-wrong record is found by the audit and skipped (or stopped on) by training; warnings
are reported and logged; an exception that is not bad data is a bug that is never skipped or cached."""
from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import fsspec
import pytest
from PIL import Image
from transformers import AutoConfig

from qwenvl.data.arguments import DataArguments
from qwenvl.data.batch.count import TokenCounter, measure_record
from qwenvl.data.batch.length_cache import build_lengths
from qwenvl.data.catalog.registry import load_dictionary
from qwenvl.data.catalog.sources import open_annotations
from qwenvl.data.dataset import make_supervised_data_module
from qwenvl.data.errors import DataError, DataKind, Origin, bad_sample
from qwenvl.data.skips import Skipped
from qwenvl.tools import audit
from tests.conftest import load_processor


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))


class NoCredentialsError(Exception):
    """What botocore raises when no AWS credentials are found."""


class _NoCredentialsFS(fsspec.AbstractFileSystem):
    protocol = "nocreds"

    def _open(self, path, mode="rb", **kwargs):
        raise NoCredentialsError("Unable to locate credentials")


def _qa(question: str, answer: str) -> list:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


# record index -> the kind of problem planted there (None: good)
PROBLEMS = {0: None, 1: "media_in_answer", 2: "empty_answer", 3: "special_token_text", 4: "bad_image",
            5: "media_unreachable", 6: None, 7: None}
WARNINGS = {6: "starts_with_assistant", 7: "ends_with_user"}


@pytest.fixture
def silent_wrong(tmp_path) -> Path:
    """A JSONL dataset with one record of every silently-wrong case, and its dictionary."""
    fsspec.register_implementation("nocreds", _NoCredentialsFS, clobber=True)
    root = tmp_path / "sw"
    (root / "media").mkdir(parents=True)
    Image.new("RGB", (56, 56), (0, 0, 200)).save(root / "media" / "ok.png")
    Image.new("RGB", (600, 2), (0, 0, 200)).save(root / "media" / "strip.png")  # 300:1
    records = [
        {"image": "ok.png", "conversations": _qa("<image>\nColour?", "blue")},
        {"image": "ok.png", "conversations": _qa("Draw it.", "Here: <image>")},
        {"image": "ok.png", "conversations": _qa("<image>\nColour?", "  ")},
        {"conversations": _qa("What does <|image_pad|> mean?", "A placeholder.")},
        {"image": "strip.png", "conversations": _qa("<image>\nColour?", "blue")},
        {"image": "nocreds://bucket/cat.png", "conversations": _qa("<image>\nColour?", "blue")},
        {"conversations": [{"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "How can I help?"}]},
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"},
                           {"from": "human", "value": "And 3+3?"}]},
    ]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "dict.json").write_text(json.dumps({"sw": {"annotation_path": "data.jsonl", "data_path": "media"}}))
    return root


def test_data_error_carries_kind_and_origin_across_processes():
    err = DataError("file a.jsonl: x", DataKind.MISSING_MEDIA, Origin(file="a.jsonl", media="x.png"))
    err.locate(Origin(dataset="d", file="a.jsonl", record=3))
    back = pickle.loads(pickle.dumps(err))  # dataloader and audit workers send errors through pickle
    assert back.kind is DataKind.MISSING_MEDIA and back.origin == Origin("d", "a.jsonl", 3, None, "x.png")
    assert str(back).startswith("dataset 'd', file a.jsonl, record 3: ")
    assert bad_sample(err) is err and bad_sample(KeyError("ours")) is None


def test_training_skips_or_stops_on_each_silent_wrong_record(silent_wrong, tiny_model_dir, caplog):
    model = tiny_model_dir("qwen2_5_vl")
    processor, config = load_processor(model), AutoConfig.from_pretrained(model)

    def dataset(policy: str):
        args = DataArguments(dataset_use="sw", dataset_dictionary=str(silent_wrong / "dict.json"),
                             bad_sample_policy=policy, max_pixels=112 * 112, min_pixels=56 * 56)
        return make_supervised_data_module(processor, args, config, seed=0)["train_dataset"]

    skipping = dataset("skip")
    with caplog.at_level(logging.WARNING):
        items = {int(skipping.mixture[i][1]): skipping[i] for i in range(len(skipping))}
    assert {r for r, item in items.items() if isinstance(item, Skipped)} == {r for r, k in PROBLEMS.items() if k}
    assert set(skipping.skip_log.counts) == {k for k in PROBLEMS.values() if k}
    logged = caplog.text
    assert "starts with an assistant turn" in logged and "ends with a user turn" in logged
    skip_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping bad sample")]
    assert len(skip_lines) == sum(1 for k in PROBLEMS.values() if k)
    assert all(line.count("dataset 'sw'") == 1 for line in skip_lines), skip_lines  # the location said once

    stopping = dataset("error")
    for i in range(len(stopping)):
        record = int(stopping.mixture[i][1])
        if PROBLEMS[record] is None:
            continue
        with pytest.raises(DataError) as err:
            stopping[i]
        assert err.value.kind.value == PROBLEMS[record]
        assert err.value.origin.dataset == "sw" and err.value.origin.record == record
        assert f"record {record}" in str(err.value)


@pytest.mark.parametrize("with_model", [False, True])
def test_the_audit_finds_every_silent_wrong_record_and_warning(silent_wrong, tiny_model_dir, tmp_path, capsys,
                                                                with_model):
    report_path = tmp_path / "r.json"
    argv = ["--dataset_use", "sw", "--dataset_dictionary", str(silent_wrong / "dict.json"), "--num_workers", "1",
            "--report", str(report_path), "--max_pixels", str(112 * 112), "--min_pixels", str(56 * 56)]
    if with_model:
        argv += ["--model_name_or_path", str(tiny_model_dir("qwen2_5_vl"))]
    status = audit.main(argv)
    out = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert status == 1
    assert {p["record"]: p["kind"] for p in report["problems"]} == {r: k for r, k in PROBLEMS.items() if k}
    assert {w["record"]: w["kind"] for w in report["warnings"]} == WARNINGS
    assert report["datasets"]["sw"]["warnings_by_kind"] == {"starts_with_assistant": 1, "ends_with_user": 1}
    assert "[media_in_answer] sw record 1 line 2" in out and "2 warning(s)" in out
    assert "NoCredentialsError" in next(p["reason"] for p in report["problems"] if p["record"] == 5)
    if with_model:  # the cache keeps each bad record's kind, for pack_data and the samplers
        cache = json.loads(Path(report["datasets"]["sw"]["length_cache"]).with_suffix(".json").read_text())
        assert cache["kinds"] == {str(r): k for r, k in PROBLEMS.items() if k}


def test_a_bug_is_not_bad_data_it_is_never_cached_and_the_audit_says_training_crashes(silent_wrong, tiny_model_dir):
    # A counter built without video settings cannot count a video: a programming error (ours), not the data's.
    video = str(Path(__file__).resolve().parents[2] / "demo_data" / "videos" / "0000.mp4")
    (silent_wrong / "v.jsonl").write_text(json.dumps(
        {"video": video, "conversations": _qa("<video>\nWhich way?", "left")}) + "\n")
    (silent_wrong / "v.json").write_text(json.dumps({"v": {"annotation_path": "v.jsonl", "data_path": "media"}}))
    spec = load_dictionary(silent_wrong / "v.json")["v"]
    source = open_annotations(spec.annotation_path)
    counter = TokenCounter(load_processor(tiny_model_dir("qwen2_5_vl")), video_settings=None)
    with pytest.raises(ValueError, match="video settings"):  # was: returned as a "bad record" and cached
        measure_record(source, spec, 0, counter)
    with pytest.raises(ValueError, match="video settings"):
        build_lengths(spec, source, counter, num_workers=0, progress=False)
    row, kind, reason, _, _, _ = audit.audit_record(source, spec, 0, counter, None, None, False)
    assert row is None and kind == audit.INTERNAL_ERROR and "whatever --bad_sample_policy" in reason
    report = {"datasets": {}, "problems": [{"dataset": "v", "record": 0, "kind": kind, "reason": reason}],
              "warnings": [], "token_counts": True, "bad_sample_policy": "skip", "internal_errors": 1,
              "records": 1, "check_seconds": 0.1, "records_per_s": 10.0, "num_workers": 1, "seconds": 0.1}
    assert "training would stop with an internal error on 1 record(s)" in audit.format_report(report)


@pytest.mark.parametrize("decode", [True, False])
def test_corrupt_image_bytes_in_a_saved_hf_dataset_are_bad_images_for_training_and_the_audit(tmp_path,
                                                                                              tiny_model_dir, decode):
    # datasets decodes a row's images as the row is read: PIL's errors came out of source[i], before any
    # media check, so the audit called them internal errors and training crashed whatever the policy.
    # Undecoded ({"bytes", "path"} rows: Image(decode=False), or a plain struct column) failed the same
    # way in resolve_media and in open_image, later.
    datasets = pytest.importorskip("datasets")
    import io
    png, jpeg = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (56, 56), (200, 0, 0)).save(png, "PNG")
    Image.new("RGB", (256, 256), (9, 9, 9)).save(jpeg, "JPEG")
    images = [png.getvalue(), jpeg.getvalue()[:len(jpeg.getvalue()) * 2 // 3], b"not an image"]
    turns = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Colour?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "images": datasets.Sequence(datasets.Image(decode=decode))})
    rows = {"messages": [turns] * 3, "images": [[{"bytes": b, "path": None}] for b in images]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "dict.json").write_text(json.dumps({"hf": {"annotation_path": "hf"}}))
    model = tiny_model_dir("qwen2_5_vl")

    report_path = tmp_path / "r.json"
    status = audit.main(["--dataset_use", "hf", "--dataset_dictionary", str(tmp_path / "dict.json"),
                         "--model_name_or_path", str(model), "--num_workers", "1", "--report", str(report_path)]
                        + ([] if decode else ["--verify_media", "True"]))  # a header alone hides truncation
    report = json.loads(report_path.read_text())
    assert status == 1
    assert {p["record"]: p["kind"] for p in report["problems"]} == {1: "bad_image", 2: "bad_image"}
    assert all("re-encode" in p["reason"] for p in report["problems"])

    args = DataArguments(dataset_use="hf", dataset_dictionary=str(tmp_path / "dict.json"), bad_sample_policy="skip",
                         max_pixels=112 * 112, min_pixels=56 * 56)
    train = make_supervised_data_module(load_processor(model), args, AutoConfig.from_pretrained(model),
                                        seed=0)["train_dataset"]
    skipped = {int(train.mixture[i][1]) for i in range(len(train)) if isinstance(train[i], Skipped)}
    assert skipped == {1, 2}
