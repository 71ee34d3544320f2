"""The audit tool: every kind of bad record found, named and tallied; exit status as the bad-sample policy;
token statistics; the length cache written as a side effect and read by training."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoConfig

from qwenvl.data.arguments import DataArguments
from qwenvl.data.batch import length_cache
from qwenvl.data.batch.length_cache import BAD, dataset_lengths
from qwenvl.data.dataset import make_supervised_data_module
from qwenvl.data.skips import Skipped
from qwenvl.tools import audit
from tests.conftest import copy_demo_annotations, load_processor

REPO = Path(__file__).resolve().parents[2]
PIXELS = ["--max_pixels", str(112 * 112), "--min_pixels", str(56 * 56), "--video_max_pixels", str(56 * 56),
          "--video_min_pixels", str(28 * 28)]
# record index -> the problem the bad dataset plants there (None: a good record)
EXPECTED = {0: None, 1: "invalid_json", 2: "missing_media", 3: "bad_image", 4: "bad_video", 5: "tag_mismatch",
            6: "no_assistant", 7: "too_long", 8: "malformed", 9: None, 10: None}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))


def _turns(prompt: str, answer: str | None = "fine") -> list:
    turns = [{"from": "human", "value": prompt}]
    return turns + ([{"from": "gpt", "value": answer}] if answer is not None else [])


def write_bad_dataset(root: Path) -> Path:
    """Write a JSONL dataset with one record of every problem kind (see EXPECTED) and its dictionary.

    A blank line after record 2 makes line numbers differ from record numbers + 1.
    """
    (root / "media").mkdir(parents=True)
    Image.new("RGB", (56, 56), (0, 0, 200)).save(root / "media" / "ok.png")
    (root / "media" / "corrupt.png").write_bytes(b"\x00this is not a png\x00" * 8)
    (root / "media" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage" * 16)
    shutil.copy(REPO / "demo_data" / "videos" / "0001.mp4", root / "media" / "ok.mp4")
    lines = [
        json.dumps({"image": "ok.png", "conversations": _turns("<image>\nColour?", "blue")}),
        '{"image": "ok.png", "conversations": [{"from": "human", "value": "broken"',  # cut short
        json.dumps({"image": "missing.png", "conversations": _turns("<image>\nColour?")}),
        "",
        json.dumps({"image": "corrupt.png", "conversations": _turns("<image>\nColour?")}),
        json.dumps({"video": "corrupt.mp4", "conversations": _turns("<video>\nWhat moves?")}),
        json.dumps({"image": "ok.png", "conversations": _turns("<image><image>\nTwo?")}),
        json.dumps({"image": "ok.png", "conversations": _turns("<image>\nNo answer here.", None)}),
        json.dumps({"conversations": _turns("Count: " + "one two three " * 60)}),
        json.dumps({"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "yo"}]}),
        json.dumps({"video": "ok.mp4", "conversations": _turns("<video>\nWhich way?", "left")}),
        json.dumps({"messages": [{"role": "user", "content": "What is 2 + 2?"},
                                 {"role": "assistant", "content": "4"}]}),
    ]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    (root / "dict.json").write_text(json.dumps({"bad": {"annotation_path": "data.jsonl", "data_path": "media"}}))
    return root


@pytest.fixture
def bad_dataset(tmp_path) -> Path:
    return write_bad_dataset(tmp_path / "bad")


def _run(argv: list[str], tmp_path: Path, capsys) -> tuple[int, dict, str]:
    report = tmp_path / "report.json"
    status = audit.main(argv + ["--report", str(report)])
    out = capsys.readouterr().out
    return status, json.loads(report.read_text()), out


def test_every_kind_of_problem_is_found_and_named(bad_dataset, tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("qwen2_5_vl")
    argv = ["--dataset_use", "bad", "--dataset_dictionary", str(bad_dataset / "dict.json"),
            "--model_name_or_path", str(model), "--model_max_length", "100", "--num_workers", "2",
            "--chunk_size", "3", *PIXELS]
    status, report, out = _run(argv, tmp_path, capsys)
    assert status == 1  # --bad_sample_policy error (the default): bad records fail the audit
    found = {p["record"]: p["kind"] for p in report["problems"]}
    assert found == {i: k for i, k in EXPECTED.items() if k}
    entry = report["datasets"]["bad"]
    assert entry["records"] == 11 and entry["bad"] == 8
    assert entry["problems_by_kind"] == {k: 1 for k in EXPECTED.values() if k}
    by_record = {p["record"]: p for p in report["problems"]}
    assert by_record[1]["line"] == 2 and by_record[3]["line"] == 5  # the blank line is line 4
    assert all(p["dataset"] == "bad" and p["file"].endswith("data.jsonl") for p in report["problems"])
    assert "missing.png" in by_record[2]["reason"] and "record 2" in by_record[2]["reason"]
    assert "--model_max_length 100" in by_record[7]["reason"]
    # The printed summary: the table, the tally and the problems with record and line.
    assert "bad" in out and "too_long 1" in out and "[invalid_json] bad record 1 line 2" in out
    assert entry["tokens"]["max"] >= 100  # the over-long record is counted at full length
    # The length cache now holds every record: full-size rows, BAD rows for unrenderable ones.
    cache = Path(entry["length_cache"])
    rows = np.load(cache)
    meta = json.loads(cache.with_suffix(".json").read_text())
    bad_rows = {i for i in range(11) if rows[i, 0] == BAD}
    assert bad_rows == {i for i, k in EXPECTED.items() if k and k != "too_long"}
    assert set(map(int, meta["errors"])) == bad_rows and rows[7, 0] > 100


def test_skip_policy_exits_zero_but_reports(bad_dataset, tmp_path, capsys):
    argv = ["--dataset_use", "bad", "--dataset_dictionary", str(bad_dataset / "dict.json"),
            "--num_workers", "1", "--bad_sample_policy", "skip"]
    status, report, out = _run(argv, tmp_path, capsys)
    assert status == 0
    # Without a model: structural and media checks only, and it says so; the over-long
    # record cannot be judged without tokens.
    assert "structural and media checks only" in out and not report["token_counts"]
    assert {p["record"]: p["kind"] for p in report["problems"]} == \
        {i: k for i, k in EXPECTED.items() if k and k != "too_long"}
    assert "would skip these 7 record(s)" in out
    assert not list(bad_dataset.glob("*.lengths.*"))  # no counts, no cache


def test_audit_and_training_agree_on_which_samples_are_bad(bad_dataset, tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("qwen2_5_vl")
    argv = ["--dataset_use", "bad", "--dataset_dictionary", str(bad_dataset / "dict.json"),
            "--model_name_or_path", str(model), "--model_max_length", "100", "--num_workers", "1", *PIXELS]
    _, report, _ = _run(argv, tmp_path, capsys)
    args = DataArguments(dataset_use="bad", dataset_dictionary=str(bad_dataset / "dict.json"),
                         bad_sample_policy="skip", max_pixels=112 * 112, min_pixels=56 * 56,
                         video_max_pixels=56 * 56, video_min_pixels=28 * 28)
    dataset = make_supervised_data_module(load_processor(model), args, AutoConfig.from_pretrained(model),
                                          model_max_length=100, seed=0)["train_dataset"]
    skipped = {int(dataset.mixture[i][1]) for i in range(len(dataset)) if isinstance(dataset[i], Skipped)}
    assert skipped == {p["record"] for p in report["problems"]}


def test_verify_media_decodes_what_headers_hide(tmp_path, capsys):
    root = tmp_path / "trunc"
    root.mkdir()
    Image.new("RGB", (200, 200), (5, 6, 7)).save(root / "full.png")
    data = (root / "full.png").read_bytes()
    (root / "cut.png").write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    (root / "a.json").write_text(json.dumps([{"image": "cut.png", "conversations": _turns("<image>Hi")}]))
    (root / "dict.json").write_text(json.dumps({"t": {"annotation_path": "a.json", "data_path": "."}}))
    argv = ["--dataset_use", "t", "--dataset_dictionary", str(root / "dict.json"), "--num_workers", "1"]
    status, report, _ = _run(argv, tmp_path, capsys)
    assert status == 0 and report["bad"] == 0
    status, report, _ = _run(argv + ["--verify_media", "True"], tmp_path, capsys)
    assert status == 1 and [p["kind"] for p in report["problems"]] == ["bad_image"]


def test_demo_data_audit_counts_tokens_and_fills_the_cache_training_reads(tiny_model_dir, tmp_path, capsys,
                                                                         monkeypatch):
    folder = copy_demo_annotations(tmp_path / "demo").parent
    model = tiny_model_dir("qwen3_vl")
    use = "demo_shapes_eval,demo_multi_image,demo_grounding,demo_text,demo_video"
    argv = ["--dataset_use", use, "--dataset_dictionary", str(folder / "dict.json"),
            "--model_name_or_path", str(model), "--num_workers", "2", *PIXELS]
    status, report, out = _run(argv, tmp_path, capsys)
    assert status == 0 and report["bad"] == 0 and report["token_counts"]
    assert report["records"] == 40 + 40 + 40 + 60 + 16  # every record once, whatever the rate
    text = report["datasets"]["demo_text"]
    assert text["visual_tokens"]["max"] == 0 and text["tokens"]["mean"] == text["text_tokens"]["mean"]
    video = report["datasets"]["demo_video"]
    assert video["visual_tokens"]["p50"] > 0 and video["vision_patches"]["max"] > 0
    for name in ("demo_shapes_eval", "demo_video"):
        line = next(x for x in out.splitlines() if x.startswith(name))
        stats = report["datasets"][name]["tokens"]
        assert line.split()[4:8] == [f"{stats['mean']:.1f}", str(stats["p50"]), str(stats["p95"]), str(stats["max"])]

    # Training with the same flags reads every length from the cache the audit wrote.
    monkeypatch.setattr(length_cache, "build_lengths", lambda *a, **k: pytest.fail("lengths were recounted"))
    args = DataArguments(dataset_use=use, dataset_dictionary=str(folder / "dict.json"), max_pixels=112 * 112,
                         min_pixels=56 * 56, video_max_pixels=56 * 56, video_min_pixels=28 * 28)
    dataset = make_supervised_data_module(load_processor(model), args, AutoConfig.from_pretrained(model),
                                          model_max_length=1024, seed=0)["train_dataset"]
    rows, bad = dataset_lengths(dataset, progress=False)
    assert bad == {} and (rows[:, 0] > 0).all()
    sample = dataset[len(dataset) - 1]
    assert rows[-1, 0] == sample["input_ids"].shape[0]


def test_dictionary_errors_exit_2(tmp_path, capsys):
    (tmp_path / "dict.json").write_text('{"a": {"annotation_path": "nope.jsonl"}}')
    status = audit.main(["--dataset_use", "a", "--dataset_dictionary", str(tmp_path / "dict.json"),
                         "--report", str(tmp_path / "r.json")])
    assert status == 2 and "annotation file not found" in capsys.readouterr().err


def test_report_goes_next_to_the_data_not_the_working_directory(bad_dataset, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    argv = ["--dataset_use", "bad", "--dataset_dictionary", str(bad_dataset / "dict.json"), "--num_workers", "1",
            "--bad_sample_policy", "skip"]
    audit.main(argv)
    expected = bad_dataset / "audit_bad.json"
    assert f"report: {expected}" in capsys.readouterr().out
    assert json.loads(expected.read_text())["datasets"]["bad"]["bad"] > 0
    assert list(cwd.iterdir()) == []
    # --output (alias of --report) puts it where it says
    audit.main(argv + ["--output", str(tmp_path / "reports" / "a.json")])
    assert (tmp_path / "reports" / "a.json").is_file()
