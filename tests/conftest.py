"""Shared fixtures: tiny checkpoints of every family, built once per test session."""
from __future__ import annotations

import os
import socket
import threading

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Qwen2-VL, Qwen2.5-VL, Qwen3-VL: the 151,936-token Qwen tokenizer and its released ids.
QWEN_VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
# Qwen3.5/3.6: their own tokenizer (248,320 rows), Gated DeltaNet layers, thinking templates.
QWEN3_5_FAMILIES = ("qwen3_5", "qwen3_5_moe")
FAMILIES = QWEN_VL_FAMILIES + QWEN3_5_FAMILIES
# Padded == flattened through AutoModelForImageTextToText (test_collate): the plain transformers
# model, so not Qwen3.5, whose Gated DeltaNet layers need the training model class's boundary-aware
# layers (tests/train/test_linear_attention.py covers those).
DENSE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(model_type)`` -> path of a tiny checkpoint of that family (built on first use)."""
    from qwenvl.tools.make_tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    built = {}

    def get(model_type: str, template: str | None = None):
        """``template`` picks a Qwen3.5/3.6 chat template release (make_tiny_model --template)."""
        key = model_type if template is None else f"{model_type}-{template}"
        if key not in built:
            built[key] = make_tiny_model(model_type, root / key, template=template)
        return built[key]

    return get


def copy_demo_annotations(folder):
    """Copy the demo annotation files and a dictionary naming them into ``folder``; returns the
    dictionary's path.  Media stay in the repo (absolute data_path), so caches written next to
    the annotations (indexes, lengths) land in ``folder``, not in the repo."""
    import json
    import shutil
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dictionary = json.loads((repo / "dataset_dictionary.json").read_text())
    for entry in dictionary.values():
        name = Path(entry["annotation_path"]).name
        shutil.copy(repo / entry["annotation_path"], folder / name)
        entry["annotation_path"], entry["data_path"] = name, str(repo / "demo_data")
    path = folder / "dict.json"
    path.write_text(json.dumps(dictionary, indent=2))
    return path


@pytest.fixture
def silent_server():
    """A local HTTP port that accepts connections and never answers; yields its URL base."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)  # several readers connect at once (tests/video/test_decode_timeout.py)
    accepted, stop = [], threading.Event()

    def accept():
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


_processors: dict = {}


def load_processor(path):
    """``AutoProcessor.from_pretrained(path)`` for tests, without paying for the tokenizer again.

    Loading the real Qwen tokenizer (151k or 248k tokens, parsed from JSON in Python) takes 2-5 s;
    it was most of the data tests' time.  The first load of a folder is kept; later calls get a
    shallow copy of the processor with its own image and video processors (which tests and
    ``configure_processor`` change) and the shared tokenizer (which nothing changes).  The cache
    is keyed by the folder's files (names, sizes, modification times), so a processor saved again
    into the same folder is loaded again.
    """
    import copy
    from pathlib import Path

    from transformers import AutoProcessor

    folder = Path(path).resolve()
    key = (folder, tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                for p in folder.iterdir() if p.is_file())))
    if key not in _processors:
        _processors[key] = AutoProcessor.from_pretrained(folder)
    fresh = copy.copy(_processors[key])
    for name in ("image_processor", "video_processor"):
        if getattr(fresh, name, None) is not None:
            setattr(fresh, name, copy.deepcopy(getattr(fresh, name)))
    return fresh
