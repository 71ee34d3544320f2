"""Lazy annotation indexes: JSONL, JSON arrays, sidecar cache, HF datasets, packed files."""
from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest

from qwenvl.data import DataError, open_annotations
from qwenvl.data.catalog import sources
from qwenvl.data.catalog.sources import scan_json_array, scan_jsonl

TRICKY = [
    {"id": 0, "text": "brackets ] } [ { inside, a string", "nested": [[1, [2, {"a": [3]}]], {}]},
    {"id": 1, "text": 'escaped \\"quote\\" and "real" quotes, backslash at end \\',
     "empty": "", "list": []},
    {"id": 2, "text": "unicode: é 字 😀 \u2028 line sep",
     "emoji_key_😀": {"deep": {"er": [None]}}},
    {"id": 3, "text": "a string with \\\\\" an escaped backslash then a quote", "n": -1.5e3},
    {"id": 4, "text": "newline\nand tab\t", "bools": [True, False, None]},
]


def chunked(data: bytes, n: int):
    for i in range(0, len(data), n):
        yield data[i:i + n]


# ----------------------------------------------------------------------------- JSON arrays

@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("ascii_only", [True, False])
def test_json_array_offsets_survive_tricky_strings(tmp_path, indent, ascii_only):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(TRICKY, indent=indent, ensure_ascii=ascii_only), encoding="utf-8")
    src = open_annotations(path)
    assert (src.kind, len(src), src.is_packed) == ("json", 5, False)
    assert [src[i] for i in range(5)] == TRICKY
    assert src[-1] == TRICKY[-1]
    assert src.offsets.dtype == np.int64 and src.offsets.size == 6  # 8 bytes/record (+1)


def test_json_array_scan_across_every_chunk_boundary():
    data = json.dumps(TRICKY, ensure_ascii=False).encode("utf-8")
    expected = scan_json_array(iter([data]))
    for size in (1, 2, 3, 5, 16, 97):
        assert np.array_equal(scan_json_array(chunked(data, size)), expected), size


def test_json_array_scan_random_documents():
    rnd = random.Random(0)
    alphabet = 'ab[]{},"\\\n é字:'

    def value(depth=0):
        r = rnd.random()
        if depth > 3 or r < 0.35:
            return "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 8)))
        if r < 0.5:
            return rnd.randint(-9, 9)
        if r < 0.75:
            return [value(depth + 1) for _ in range(rnd.randint(0, 3))]
        return {str(value(depth + 3)): value(depth + 1) for _ in range(rnd.randint(0, 3))}

    for _ in range(60):
        records = [{"v": value()} for _ in range(rnd.randint(1, 6))]
        data = json.dumps(records, indent=rnd.choice([None, 1])).encode()
        for size in (1, 4, 1 << 20):
            off = scan_json_array(chunked(data, size))
            assert [json.loads(data[off[i]:off[i + 1] - 1]) for i in range(off.size - 1)] == \
                records


def test_small_chunks_on_real_files(tmp_path, monkeypatch, write_json):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 7)
    path = write_json(tmp_path / "a.json", TRICKY, ensure_ascii=False)
    assert list(open_annotations(path)) == TRICKY
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in TRICKY) + "\n \n\n", encoding="utf-8")
    assert list(open_annotations(path)) == TRICKY


def test_empty_and_single_element_arrays(tmp_path):
    (tmp_path / "e.json").write_text(" [ \n ] \n")
    assert len(open_annotations(tmp_path / "e.json")) == 0
    (tmp_path / "one.json").write_text('[{"a": 1}]')
    assert open_annotations(tmp_path / "one.json")[0] == {"a": 1}
    (tmp_path / "empty.json").write_text("")
    assert len(open_annotations(tmp_path / "empty.json")) == 0


@pytest.mark.parametrize("text, expected", [
    ('[{"a": 1}, {"b": [2}', "ends with 2 bracket(s) still open"),
    ('[{"a": "unterminated}]', "ends inside a string"),
    ('[{"a": 1}] [{"b": 2}]', "outside the top-level array"),
    ('[{"a": 1}] trailing', "extra data after the closing ']'"),
    ('{\n  "data": [1, 2]\n}', "the top level is a JSON object, not a list of records"),
    ("garbage", "neither a JSON array"),
])
def test_malformed_json_files_are_explained(tmp_path, text, expected):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(DataError, match="Fix") as info:
        open_annotations(tmp_path / "bad.json")
    assert expected in str(info.value) and "bad.json" in str(info.value)


def test_bad_array_element_fails_on_read_with_line_number(tmp_path):
    (tmp_path / "a.json").write_text('[\n  {"ok": 1},\n  {"ok": 2,\n   "bad": }\n]\n')
    src = open_annotations(tmp_path / "a.json")
    assert len(src) == 2 and src[0] == {"ok": 1}
    with pytest.raises(DataError, match=r"file .*a.json, record 1 \(line 4\) is not valid JSON"):
        src[1]


def test_missing_file_and_plain_folder(tmp_path):
    with pytest.raises(DataError, match="annotation file not found"):
        open_annotations(tmp_path / "nope.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="not a dataset saved with save_to_disk"):
        open_annotations(tmp_path / "folder")


# ----------------------------------------------------------------------------- JSONL

def test_jsonl_skips_blank_lines_and_keeps_unicode(tmp_path):
    lines = [json.dumps(r, ensure_ascii=False) for r in TRICKY]
    # Blank lines first, between records, CRLF, whitespace-only; no final newline.
    text = "\n" + lines[0] + "\n\n" + lines[1] + "\r\n   \n\t\n" + "\n".join(lines[2:])
    (tmp_path / "a.jsonl").write_text(text, encoding="utf-8")
    src = open_annotations(tmp_path / "a.jsonl")
    assert (src.kind, len(src)) == ("jsonl", 5)
    assert list(src) == TRICKY
    with pytest.raises(IndexError):
        src[5]


def test_jsonl_with_bom_and_json_extension(tmp_path):
    (tmp_path / "a.json").write_bytes(b"\xef\xbb\xbf" + b'{"a": 1}\n{"a": 2}\n')
    src = open_annotations(tmp_path / "a.json")
    assert src.kind == "jsonl" and list(src) == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize("encoding, named", [("utf-16", "UTF-16LE"), ("utf-16-be", "UTF-16BE"),
                                             ("utf-16-le", "UTF-16LE"), ("utf-32", "UTF-32LE")])
@pytest.mark.parametrize("name", ["a.jsonl", "a.json"])
def test_utf16_and_utf32_files_are_named_once_not_record_by_record(tmp_path, encoding, named, name):
    # What Windows tools and PowerShell's ">" write: read as UTF-8, every record was reported invalid.
    text = '{"a": 1}\n{"a": 2}\n' if name.endswith("l") else '[{"a": 1}, {"a": 2}]'
    (tmp_path / name).write_bytes(text.encode(encoding))
    with pytest.raises(DataError, match=f"is {named} text, not UTF-8") as info:
        open_annotations(tmp_path / name)
    assert name in str(info.value) and f"iconv -f {named} -t UTF-8" in str(info.value)


def test_jsonl_bad_line_reported_on_read_with_file_and_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"a": 1}\n\n{"a": 2,}\n{"a": 3}\n')
    src = open_annotations(tmp_path / "a.jsonl")
    assert len(src) == 3 and src[2] == {"a": 3}  # problems surface when the record is read
    with pytest.raises(DataError) as info:
        src[1]
    msg = str(info.value)
    assert f"file {tmp_path / 'a.jsonl'}, record 1 (line 3) is not valid JSON" in msg
    assert "Expecting property name" in msg and "Fix" in msg


def test_jsonl_record_must_be_an_object(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"a": 1}\n"just a string"\n')
    with pytest.raises(DataError, match="expected a JSON object, got str"):
        open_annotations(tmp_path / "a.jsonl")[1]


def test_scan_jsonl_directly():
    data = b'{"a":1}\n  \n{"b":2}\n'
    off = scan_jsonl(chunked(data, 3), lambda s, n: data[s:s + n])
    assert off.tolist() == [0, 11, len(data)]  # the blank line is not a record


# ----------------------------------------------------------------------------- sidecar cache

def test_sidecar_index_reused_and_rebuilt_when_file_changes(tmp_path, monkeypatch, write_json):
    path = write_json(tmp_path / "a.json", TRICKY)
    src = open_annotations(path, cache=True)
    sidecar = tmp_path / "a.json.idx.npy"
    assert sidecar.exists() and len(src) == 5

    def no_scan(*args, **kwargs):
        raise AssertionError("the cached index should have been used")

    monkeypatch.setattr(sources, "scan_json_array", no_scan)
    assert list(open_annotations(path, cache=True)) == TRICKY
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))

    write_json(path, TRICKY + [{"id": 5}])  # new size and mtime: stale index
    assert len(open_annotations(path, cache=True)) == 6
    # Same size, new mtime: rebuilt too (keyed by size *and* mtime). Moving record 4's text
    # into record 3 keeps the byte count but moves the boundary between them.
    write_json(path, [{"t": "aa"}, {"t": "bbbb"}])
    assert open_annotations(path, cache=True)[1] == {"t": "bbbb"}
    before = os.stat(path)
    path.write_bytes(path.read_bytes().replace(b'"aa"', b'"aaa"').replace(b'"bbbb"', b'"bbb"'))
    assert os.stat(path).st_size == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert list(open_annotations(path, cache=True)) == [{"t": "aaa"}, {"t": "bbb"}]


def test_sidecar_falls_back_to_user_cache_when_folder_unwritable(tmp_path, write_json):
    path = write_json(tmp_path / "a.json", TRICKY)
    # A directory where the sidecar should go makes writing there fail even as root.
    (tmp_path / "a.json.idx.npy").mkdir()
    open_annotations(path, cache=True)
    cached = list((tmp_path / "xdg_cache" / "qwenvl" / "index").glob("*-a.json.idx.npy"))
    assert len(cached) == 1
    assert list(open_annotations(path, cache=True)) == TRICKY


def test_small_files_get_no_sidecar_by_default(tmp_path, write_json):
    path = write_json(tmp_path / "a.json", TRICKY)
    open_annotations(path)
    assert not (tmp_path / "a.json.idx.npy").exists()


def test_corrupt_sidecar_is_rebuilt(tmp_path, write_json):
    path = write_json(tmp_path / "a.json", TRICKY)
    (tmp_path / "a.json.idx.npy").write_bytes(b"not numpy")
    assert list(open_annotations(path, cache=True)) == TRICKY


# ----------------------------------------------------------------------------- packed, HF, fsspec

def test_packed_json_array_and_jsonl(tmp_path, write_json):
    packs = [[{"messages": [1]}, {"messages": [2]}], [{"messages": [3]}]]
    src = open_annotations(write_json(tmp_path / "p.json", packs, indent=1))
    assert src.is_packed and len(src) == 2 and src[0] == packs[0]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(p) for p in packs))
    src = open_annotations(tmp_path / "p.jsonl")
    assert src.is_packed and src[1] == packs[1]
    (tmp_path / "mixed.json").write_text(json.dumps([[{"a": 1}], {"a": 2}]))
    with pytest.raises(DataError, match="not a mix"):
        open_annotations(tmp_path / "mixed.json")[1]


def test_hf_saved_dataset_rows_with_pil_images(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image
    rows = {
        "messages": [[{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                        "text": "hi"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]] * 3,
        "images": [[Image.new("RGB", (4, 4), (255, 0, 0))]] * 3,
    }
    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"),
                                   "text": datasets.Value("string")}]}],
        "images": datasets.Sequence(datasets.Image()),
    })
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    src = open_annotations(tmp_path / "hf")
    assert (src.kind, len(src), src.is_packed) == ("hf", 3, False)
    row = src[2]
    assert isinstance(row["images"][0], Image.Image)
    assert row["images"][0].getpixel((0, 0)) == (255, 0, 0)
    assert row["messages"][0]["content"][1]["text"] == "hi"

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": [1]})}).save_to_disk(
        str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"splits \['train'\].*dd/train"):
        open_annotations(tmp_path / "dd")


def test_hf_rows_keep_each_rows_own_tools_and_call_arguments(tmp_path):
    """Arrow gives a column one struct type, so row 0's tool schema and call arguments came back with
    row 1's keys as nulls ("zone": null), which the template would write into the trained text."""
    datasets = pytest.importorskip("datasets")
    weather = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    clock = {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}

    def call(name, arguments):
        return [{"type": "function", "function": {"name": name, "arguments": arguments}}]

    rows = [{"tools": [weather], "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": call("get_weather", {"city": "Paris"})},
                {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]},
            {"tools": [clock], "messages": [
                {"role": "user", "content": "Time in UTC?"},
                {"role": "assistant", "content": "", "tool_calls": call("get_time", {"zone": "UTC"})},
                {"role": "tool", "content": "noon"}, {"role": "assistant", "content": "Noon."}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    assert datasets.load_from_disk(str(tmp_path / "hf"))[0]["tools"] != [weather]  # what Arrow does
    src = open_annotations(tmp_path / "hf")
    for i, row in enumerate(rows):
        assert src[i]["tools"] == row["tools"]
        assert src[i]["messages"][1]["tool_calls"] == row["messages"][1]["tool_calls"]
        assert src[i]["messages"][0]["content"] == row["messages"][0]["content"]


def test_fsspec_urls(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    with fsspec.open("memory://anns/r.jsonl", "wb") as f:
        f.write(b'{"a": 1}\n{"a": 2}\n')
    src = open_annotations("memory://anns/r.jsonl")
    assert len(src) == 2 and src[1] == {"a": 2}
    (tmp_path / "a.json").write_text(json.dumps(TRICKY))
    assert list(open_annotations(f"file://{tmp_path}/a.json")) == TRICKY


def test_usable_after_fork_and_pickle(tmp_path, write_json):
    src = open_annotations(write_json(tmp_path / "a.json", TRICKY), cache=True)
    assert src[0] == TRICKY[0]  # the parent has an open handle now
    clone = pickle.loads(pickle.dumps(src))  # spawn-started workers receive a pickle
    assert clone[3] == TRICKY[3] and clone._reader._pid == os.getpid()
    if not hasattr(os, "fork"):
        return
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must reopen its own handle, then read
        try:
            os.write(write_fd, json.dumps([src[4], src[1], src._reader._pid == os.getpid()])
                     .encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        got = json.loads(f.read())
    os.waitpid(pid, 0)
    assert got == [TRICKY[4], TRICKY[1], True]
    assert src[2] == TRICKY[2]  # the parent's handle is unaffected
