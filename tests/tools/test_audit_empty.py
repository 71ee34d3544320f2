"""The audit names every --dataset_use entry that adds no sample (an empty file, a rate of 0) and fails
when the whole mixture is empty (training would end in torch's 'num_samples should be a positive
integer')."""
from __future__ import annotations

import json

import pytest

from qwenvl.tools import audit


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))


def test_empty_entries_are_named_and_an_empty_mixture_fails(tmp_path, capsys):
    record = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
    (tmp_path / "full.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "dict.json").write_text(json.dumps({"full": {"annotation_path": "full.jsonl"},
                                                    "empty": {"annotation_path": "empty.jsonl"}}))

    def run(use: str) -> tuple[int, str]:
        status = audit.main(["--dataset_use", use, "--dataset_dictionary", str(tmp_path / "dict.json"),
                             "--num_workers", "1", "--report", str(tmp_path / "r.json")])
        return status, capsys.readouterr().out

    status, out = run("full,empty")
    assert status == 0 and "dataset 'empty' adds no sample to the mixture: its file holds no records" in out
    status, out = run("full%0,empty")
    assert status == 1 and "the mixture is empty" in out
    assert "dataset 'full' adds no sample to the mixture: its rate is 0" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["empty"]["mixture"] and [e["dataset"] for e in report["empty"]["entries"]] == ["full", "empty"]
    # A rate that the file's size rounds to no sample says so, in percent as written in --dataset_use.
    status, out = run("full%0.001")
    assert status == 1 and "dataset 'full' adds no sample to the mixture: 0.001% of its 1 records rounds to 0 " \
                           "samples; raise its rate" in out
