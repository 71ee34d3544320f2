"""Annotation-file errors point at the right place: a JSONL record cut short at the end of its line is
reported on that line (not the next), and a JSON array's trailing or doubled comma is named instead
of surfacing as a phantom empty record."""
from __future__ import annotations

import shlex
import sys

import pytest

from qwenvl.data.catalog.sources import open_annotations
from qwenvl.data.errors import DataError, DataKind
from tests.commands import run_command


@pytest.mark.parametrize("text, line", [
    ('{"a": 1}\n{"b": 2\n{"c": 3}\n', 2),  # a closing brace missing at the end of line 2
    ('{"a": 1}\n\n{"b": [1, 2\n{"c": 3}\n', 3),  # ... after a blank line
    ('{"a": 1}\n{"b": 2,}\n', 2),  # an error inside the line stays where it is
    ('{"a": 1}\n{"b": 2', 2),  # the last line, no final newline
])
def test_a_jsonl_error_at_the_end_of_a_line_is_reported_on_that_line(tmp_path, text, line):
    (tmp_path / "a.jsonl").write_text(text)
    with pytest.raises(DataError) as err:
        open_annotations(tmp_path / "a.jsonl")[1]
    assert f"record 1 (line {line}) is not valid JSON" in str(err.value)
    assert err.value.kind is DataKind.INVALID_JSON and err.value.origin.line == line


@pytest.mark.parametrize("ends", ["\n", "\r\n"])
def test_a_jsonl_record_followed_by_a_comma_is_named(tmp_path, ends):
    """Lines copied out of a JSON array keep their commas; JSON's own message was 'Extra data'."""
    (tmp_path / "a.jsonl").write_text(f'{{"a": 1}}{ends}{{"b": 2}},{ends}{{"c": 3}}{ends}', newline="")
    with pytest.raises(DataError) as err:
        open_annotations(tmp_path / "a.jsonl")[1]
    assert "record 1 (line 2) is not valid JSON: a comma after the record. Fix: delete it" in str(err.value)
    assert err.value.kind is DataKind.INVALID_JSON
    assert open_annotations(tmp_path / "a.jsonl")[2] == {"c": 3}


def test_a_json_array_error_at_the_end_of_a_line_is_reported_on_that_line(tmp_path):
    (tmp_path / "a.json").write_text('[\n  {"ok": 1},\n  {"ok": 2\n  ,"x": }\n]\n')
    with pytest.raises(DataError, match=r"record 1 \(line 4\)"):
        open_annotations(tmp_path / "a.json")[1]


@pytest.mark.parametrize("text, named, line", [
    ('[\n  {"a": 1},\n  {"b": 2},\n]\n', "a trailing comma after the last record", 3),
    ('[{"a": 1},\n ,\n {"b": 2}]', "an empty element (a comma with no record before it), after record 0", 2),
    ('[{"a": 1},]', "a trailing comma after the last record", 1),
])
def test_a_trailing_or_doubled_comma_is_named_not_a_phantom_record(tmp_path, text, named, line):
    (tmp_path / "a.json").write_text(text)
    with pytest.raises(DataError) as err:
        open_annotations(tmp_path / "a.json")
    message = str(err.value)
    assert named in message and f"(line {line}," in message and "delete that comma" in message
    assert err.value.kind is DataKind.INVALID_JSON


def test_arrays_without_stray_commas_still_open(tmp_path):
    (tmp_path / "a.json").write_text('[\n  {"a": 1},\n\n  {"b": 2}\n]\n')
    assert list(open_annotations(tmp_path / "a.json")) == [{"a": 1}, {"b": 2}]
    (tmp_path / "e.json").write_text("[ ]")
    assert len(open_annotations(tmp_path / "e.json")) == 0


@pytest.mark.parametrize("name", ["a.parquet", "a.jsonl"])
def test_a_parquet_file_is_named_with_the_command_that_converts_it(tmp_path, name):
    """Hugging Face Hub datasets download as Parquet; the message named only the first byte (b'P'),
    and a Parquet file called .jsonl failed record by record as invalid UTF-8."""
    import datasets

    path = tmp_path / name
    datasets.Dataset.from_list([{"prompt": "2+2?", "completion": "4"}]).to_parquet(str(path))
    with pytest.raises(DataError) as err:
        open_annotations(path)
    message = str(err.value)
    assert f"file {path}: is a Parquet file" in message and err.value.kind is DataKind.INVALID_JSON
    command = shlex.split(message.split("Fix: ")[1].split(" and set annotation_path")[0])
    assert command[:2] == ["python", "-c"]
    run_command([sys.executable, *command[1:]], check=True, timeout=300)  # the message's command works as written
    assert open_annotations(f"{path}.hf")[0] == {"prompt": "2+2?", "completion": "4"}


def test_a_gzip_file_is_named_with_how_to_decompress_it(tmp_path):
    import gzip

    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b'{"a": 1}\n'))
    with pytest.raises(DataError, match=r"is gzip-compressed, not JSON or JSONL. Fix: decompress it \(gunzip -k"):
        open_annotations(tmp_path / "a.jsonl.gz")


def test_a_record_not_in_utf8_says_how_to_convert_the_file(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes('{"a": "ok"}\n{"b": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataError) as err:
        open_annotations(path)[1]
    assert "record 1 (line 2) is not valid JSON" in str(err.value)
    assert f"Fix: the file is not UTF-8; convert it, e.g. iconv -f WINDOWS-1252 -t UTF-8 {path}" in str(err.value)
