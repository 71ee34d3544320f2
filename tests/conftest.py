"""Shared fixtures: tiny checkpoints of every family, built once per test session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
DENSE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(model_type)`` -> path of a tiny checkpoint of that family (built on first use)."""
    from qwenvl.tools.make_tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    built = {}

    def get(model_type: str):
        if model_type not in built:
            built[model_type] = make_tiny_model(model_type, root / model_type)
        return built[model_type]

    return get
