"""Fixtures that write small, real annotation files, images and dictionaries into tmp_path."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def _private_index_cache(tmp_path, monkeypatch):
    """Index-cache fallbacks go to the test's tmp dir, never to the real ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))


@pytest.fixture
def write_json():
    """write_json(path, obj, **dumps_kwargs) -> Path: a JSON file (folders created)."""
    def write(path: Path, obj, **kwargs) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, **kwargs), encoding="utf-8")
        return path
    return write


@pytest.fixture
def write_jsonl():
    """write_jsonl(path, records) -> Path: one JSON object per line."""
    def write(path: Path, records) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                        encoding="utf-8")
        return path
    return write


@pytest.fixture
def make_image():
    """make_image(path, color=(255, 0, 0), size=(8, 6), mode="RGB") -> Path: a small PNG."""
    def make(path: Path, color=(255, 0, 0), size=(8, 6), mode="RGB") -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if mode == "RGBA" and len(color) == 3:
            color = (*color, 128)
        Image.new(mode, size, color).save(path)
        return path
    return make


def llava_record(i: int, image: str | None = "img0.png") -> dict:
    """A LLaVA-style record; text-only when ``image`` is None."""
    record = {"id": i, "conversations": [
        {"from": "human", "value": ("<image>\n" if image else "") + f"What is {i}?"},
        {"from": "gpt", "value": f"It is {i}."}]}
    if image:
        record["image"] = image
    return record


@pytest.fixture
def llava_dataset(tmp_path, make_image, write_json, write_jsonl):
    """A folder with 2 images, a 5-record JSON array, a 3-record JSONL and a dictionary.

    Returns a dict of paths: root, images, json, jsonl, dictionary.
    """
    root = tmp_path / "ds"
    images = root / "images"
    make_image(images / "img0.png")
    make_image(images / "img1.png", color=(0, 255, 0))
    ann_json = write_json(root / "anns" / "a.json", [llava_record(i) for i in range(5)])
    ann_jsonl = write_jsonl(root / "anns" / "b.jsonl",
                            [llava_record(i, image=None) for i in range(3)])
    dictionary = write_json(root / "dataset_dictionary.json", {
        "a": {"annotation_path": "anns/a.json", "data_path": "images", "sampling_rate": 0.5,
              "length": 5},
        "b": {"annotation_path": "anns/b.jsonl", "repeat_time": 2.5},
        "c": {"annotation_path": "anns/b.jsonl", "data_path": ""},
    }, indent=2)
    return {"root": root, "images": images, "json": ann_json, "jsonl": ann_jsonl,
            "dictionary": dictionary}
