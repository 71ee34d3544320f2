"""dataset_dictionary.json loading/validation, --dataset_use parsing, data_dict/data_list."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import qwenvl
import qwenvl.data as data
from qwenvl.data import DataError, DatasetSpec, load_dictionary, parse_dataset_use
from qwenvl.data.catalog import registry
from qwenvl.tools import dataset_use as dataset_use_tool

REPO = Path(qwenvl.__file__).parents[1]


def test_load_resolves_relative_paths_against_dictionary_folder(llava_dataset, tmp_path,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)  # resolution must not depend on the working directory
    specs = load_dictionary(llava_dataset["dictionary"])
    root = llava_dataset["root"]
    assert list(specs) == ["a", "b", "c"]
    a = specs["a"]
    assert a == DatasetSpec("a", str(root / "anns" / "a.json"), str(root / "images"), 0.5,
                            None, 5)
    assert specs["b"].data_path == "" and specs["b"].repeat_time == 2.5
    assert (a.rate, specs["b"].rate, specs["c"].rate) == (0.5, 2.5, 1.0)
    with pytest.raises(Exception):
        a.name = "x"  # frozen


def test_rate_property_keeps_explicit_zero():
    assert DatasetSpec("z", "f.json", sampling_rate=0.0).rate == 0.0


def test_default_dictionary_is_at_repo_root():
    assert registry.DEFAULT_DICTIONARY == REPO / "dataset_dictionary.json"


def test_missing_dictionary_file_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="not found. Fix: create it"):
        load_dictionary(tmp_path / "nope.json")


def test_every_problem_is_reported_at_once(tmp_path, write_json, write_jsonl):
    write_jsonl(tmp_path / "ok.jsonl", [{"messages": []}] * 3)
    (tmp_path / "not_a_dir.txt").write_text("x")
    write_json(tmp_path / "d.json", {
        "typo": {"annotation_path": "ok.jsonl", "sampleing_rate": 0.5},
        "missing_ann": {"annotation_path": "nope.json"},
        "missing_media": {"annotation_path": "ok.jsonl", "data_path": "no_such_folder"},
        "file_media": {"annotation_path": "ok.jsonl", "data_path": "not_a_dir.txt"},
        "both": {"annotation_path": "ok.jsonl", "sampling_rate": 0.5, "repeat_time": 2},
        "text_rate": {"annotation_path": "ok.jsonl", "sampling_rate": "30%"},
        "negative": {"annotation_path": "ok.jsonl", "repeat_time": -1},
        "bad_length": {"annotation_path": "ok.jsonl", "length": 11739},
        "no_ann": {"data_path": ""},
        "not_object": [1, 2],
        "good": {"annotation_path": "ok.jsonl", "length": 3},
    })
    with pytest.raises(DataError) as info:
        load_dictionary(tmp_path / "d.json")
    msg = str(info.value)
    assert "10 problems" in msg
    assert "dataset 'typo': unknown key 'sampleing_rate'. Did you mean 'sampling_rate'?" in msg
    assert f"annotation file not found: {tmp_path / 'nope.json'}" in msg
    assert f"media folder not found: {tmp_path / 'no_such_folder'}" in msg
    assert "media folder is not a folder" in msg
    assert "both 'sampling_rate' and 'repeat_time'" in msg and "keep only one" in msg
    assert "'sampling_rate' must be a number such as 0.3 or 2.5, got '30%'" in msg
    assert "'repeat_time' must be a finite number >= 0, got -1" in msg
    assert "'length' is 11739 but" in msg and 'set "length": 3' in msg
    assert "dataset 'no_ann': 'annotation_path' is missing" in msg
    assert "dataset 'not_object': expected an object" in msg
    assert "'good'" not in msg
    assert all(f"Fix" in line for line in msg.splitlines()[1:])


def test_text_only_and_url_paths_are_not_checked(tmp_path, write_json, write_jsonl):
    write_jsonl(tmp_path / "t.jsonl", [{"messages": []}])
    write_json(tmp_path / "d.json", {
        "text_only": {"annotation_path": "t.jsonl"},
        "empty_media": {"annotation_path": "t.jsonl", "data_path": "", "length": 1},
        "null_media": {"annotation_path": "t.jsonl", "data_path": None},
        "remote_media": {"annotation_path": "t.jsonl", "data_path": "s3://bucket/images"},
        "remote_ann": {"annotation_path": "gs://bucket/ann.jsonl", "length": 99},
        "file_url": {"annotation_path": f"file://{tmp_path}/t.jsonl"},
    })
    specs = load_dictionary(tmp_path / "d.json")
    assert specs["remote_media"].data_path == "s3://bucket/images"
    assert specs["remote_ann"].annotation_path == "gs://bucket/ann.jsonl"
    assert specs["file_url"].annotation_path == str(tmp_path / "t.jsonl")
    assert specs["null_media"].data_path == ""


def test_check_files_false_skips_filesystem(tmp_path, write_json):
    write_json(tmp_path / "d.json", {"x": {"annotation_path": "nope.json", "data_path": "no"}})
    assert load_dictionary(tmp_path / "d.json", check_files=False)["x"].annotation_path == str(
        tmp_path / "nope.json")


def test_length_is_checked_for_json_arrays_and_hf_datasets(tmp_path, write_json):
    datasets = pytest.importorskip("datasets")
    write_json(tmp_path / "a.json", [{"messages": []}] * 4)
    datasets.Dataset.from_dict({"x": [1, 2]}).save_to_disk(str(tmp_path / "hf"))
    write_json(tmp_path / "d.json", {"a": {"annotation_path": "a.json", "length": 4},
                                     "hf": {"annotation_path": "hf", "length": 3}})
    with pytest.raises(DataError, match=r"'length' is 3 but .*hf holds 2 records") as info:
        load_dictionary(tmp_path / "d.json")
    assert "1 problem:" in str(info.value)


def test_trailing_comma_reported_with_line_and_column(tmp_path):
    text = '{\n  "a": {"annotation_path": "x.json"},\n  "b": {"annotation_path": "y.json"},\n}\n'
    (tmp_path / "d.json").write_text(text)
    with pytest.raises(DataError) as info:
        load_dictionary(tmp_path / "d.json", check_files=False)
    # The comma is the last character of line 3: column len('  "b": {"annotation_path": "y.json"},')
    col = len('  "b": {"annotation_path": "y.json"},')
    assert f"trailing comma at line 3, column {col}" in str(info.value)
    assert "delete that comma" in str(info.value)


def test_trailing_comma_inside_a_dataset(tmp_path):
    (tmp_path / "d.json").write_text('{"a": {"annotation_path": "x.json",}}')
    with pytest.raises(DataError, match="trailing comma at line 1, column 35"):
        load_dictionary(tmp_path / "d.json", check_files=False)


def test_other_json_errors_give_line_and_column(tmp_path):
    (tmp_path / "d.json").write_text('{\n  "a" {"annotation_path": "x.json"}\n}')
    with pytest.raises(DataError, match=r"invalid JSON at line 2, column 7: Expecting ':'"):
        load_dictionary(tmp_path / "d.json", check_files=False)


def test_duplicate_names_and_bad_names(tmp_path):
    (tmp_path / "d.json").write_text(
        '{"a": {"annotation_path": "x"}, "a": {"annotation_path": "y"}, "b%2": '
        '{"annotation_path": "x"}}')
    with pytest.raises(DataError) as info:
        load_dictionary(tmp_path / "d.json", check_files=False)
    assert "dataset 'a': defined 2 times" in str(info.value)
    assert "dataset 'b%2': the name must be" in str(info.value)


def test_top_level_must_be_an_object(tmp_path):
    (tmp_path / "d.json").write_text('[{"annotation_path": "x"}]')
    with pytest.raises(DataError, match="top level must be an object"):
        load_dictionary(tmp_path / "d.json")


# ----------------------------------------------------------------------------- --dataset_use

@pytest.fixture
def specs(tmp_path, write_json):
    write_json(tmp_path / "d.json", {
        "coco": {"annotation_path": "c.json", "sampling_rate": 0.3},
        "llava": {"annotation_path": "l.json", "repeat_time": 2.5},
        "video_qa": {"annotation_path": "v.json"},
    })
    return load_dictionary(tmp_path / "d.json", check_files=False)


def test_parse_percentages_and_own_rates(specs):
    entries = parse_dataset_use(" coco%50 , llava%250,video_qa", specs)
    assert [(e.spec.name, e.rate) for e in entries] == [("coco", 0.5), ("llava", 2.5),
                                                       ("video_qa", 1.0)]
    entries = parse_dataset_use("coco,llava, video_qa %100", specs)
    assert [e.rate for e in entries] == [0.3, 2.5, 1.0]
    assert parse_dataset_use("coco%12.5", specs)[0].rate == 0.125
    assert parse_dataset_use("coco % 7", specs)[0].rate == 0.07
    assert parse_dataset_use("coco%0", specs)[0].rate == 0.0
    assert parse_dataset_use("llava%100", specs)[0].spec is specs["llava"]


@pytest.mark.parametrize("text, expected", [
    ("coco%", "no number after '%'. Fix: write e.g. 'coco%50'"),
    ("coco%x", "'x' is not a number. Fix: write e.g. 'coco%50' or 'coco%12.5'"),
    ("coco%-5", "cannot be negative"),
    ("coco%5%", "'5%' is not a number"),
    ("coco,,llava", "empty item"),
    ("coco,coco%20", "listed twice"),
    ("", "--dataset_use is empty"),
])
def test_bad_syntax_is_explained(specs, text, expected):
    with pytest.raises(DataError, match="Fix|known") as info:
        parse_dataset_use(text, specs)
    assert expected in str(info.value)


def test_unknown_names_listed_with_known_ones_and_did_you_mean(specs):
    with pytest.raises(DataError) as info:
        parse_dataset_use("cocoo%50,nothing_like_it,llava%x", specs)
    msg = str(info.value)
    assert "3 problems" in msg
    assert "unknown dataset 'cocoo'. Did you mean 'coco'?" in msg
    assert "unknown dataset 'nothing_like_it'. Fix:" in msg
    assert "coco, llava, video_qa" in msg
    assert "'x' is not a number" in msg


def test_a_name_in_the_wrong_case_is_suggested(specs):
    """difflib finds no match between 'LLAVA' and 'llava' (every letter differs)."""
    with pytest.raises(DataError, match="unknown dataset 'LLAVA'. Did you mean 'llava'?"):
        parse_dataset_use("LLAVA%50", specs)


# ----------------------------------------------------------------------------- official API

@pytest.fixture
def default_dictionary(llava_dataset, monkeypatch):
    monkeypatch.setattr(registry, "DEFAULT_DICTIONARY", llava_dataset["dictionary"])
    monkeypatch.setattr(data.data_dict, "_specs", None)
    return llava_dataset


def test_data_dict_loads_lazily_from_default_dictionary(default_dictionary):
    assert data.data_dict._specs is None
    assert sorted(data.data_dict) == ["a", "b", "c"]
    assert data.data_dict["a"] == {"annotation_path": str(default_dictionary["json"]),
                                   "data_path": str(default_dictionary["images"]),
                                   "sampling_rate": 0.5, "length": 5}
    assert "b" in data.data_dict and len(data.data_dict) == 3


def test_data_list_official_syntax(default_dictionary):
    out = data.data_list(["a%50", "b", "c%250"])
    assert [(d["name"], d["sampling_rate"]) for d in out] == [("a", 0.5), ("b", 2.5),
                                                              ("c", 2.5)]
    assert out[0]["annotation_path"] == str(default_dictionary["json"])
    assert out[0]["data_path"] == str(default_dictionary["images"])
    with pytest.raises(DataError, match="unknown dataset 'd'. .*a, b, c"):
        data.data_list(["d"])


def test_import_does_not_need_a_dictionary(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "DEFAULT_DICTIONARY", tmp_path / "missing.json")
    monkeypatch.setattr(data.data_dict, "_specs", None)
    assert "not loaded" in repr(data.data_dict)
    with pytest.raises(DataError, match="not found"):
        len(data.data_dict)


# ----------------------------------------------------------------------------- the tool

def test_tool_prints_mixture_string(llava_dataset, capsys):
    assert dataset_use_tool.main(["--dataset_dictionary", str(llava_dataset["dictionary"])]) == 0
    assert capsys.readouterr().out == "a%50,b%250,c%100\n"


def test_tool_reports_problems_and_exits_2(tmp_path, capsys):
    (tmp_path / "d.json").write_text('{"a": {"annotation_path": "x.json",}}')
    assert dataset_use_tool.main(["--dataset_dictionary", str(tmp_path / "d.json")]) == 2
    assert "trailing comma" in capsys.readouterr().err


def test_tool_runs_as_module(llava_dataset):
    out = subprocess.run([sys.executable, "-m", "qwenvl.tools.dataset_use", "--dataset_dictionary",
                          str(llava_dataset["dictionary"])], capture_output=True, text=True,
                         cwd=REPO, check=True)
    assert out.stdout == "a%50,b%250,c%100\n"


def test_a_fraction_written_as_a_percentage_is_warned(specs, caplog):
    """'%' takes a percentage while the dictionary's sampling_rate is a fraction: 'coco%0.5' keeps 0.5%, most
    likely meant as half; the run goes on (it may be meant) and says how to write half."""
    import logging

    from qwenvl.data.catalog import registry

    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        assert parse_dataset_use("coco%0.5", specs)[0].rate == 0.005
    messages = [r.getMessage() for r in caplog.records if r.name == registry.__name__]
    assert len(messages) == 1 and "keeps 0.5% of the dataset" in messages[0] and "'coco%50'" in messages[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        parse_dataset_use("coco%1,llava%0,video_qa%250", specs)
    assert not [r for r in caplog.records if r.name == registry.__name__]
