"""Qwen3-VL-MoE experts under ZeRO-3 (qwenvl/train/zero3_experts.py): a checkpoint in transformers 5's own expert
layout is refused at start-up (transformers' ZeRO-3 loader would transpose it and stop deep inside), one in the
released layout trains; and the transformers behaviour behind it, pinned so its fix shows."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import safetensors.torch as st

from qwenvl.train.zero3_experts import stored_shape
from tests.commands import run_command

from .conftest import free_port
from .test_train_qwen import _env, _flags

DOWN = "model.language_model.layers.0.mlp.experts.down_proj"


def _released_layout_copy(model_dir, folder: Path) -> Path:
    """``model_dir`` with its expert tensors stored as the released checkpoints store them (transposed)."""
    shutil.copytree(model_dir, folder)
    weights = folder / "model.safetensors"
    tensors = st.load_file(weights)
    st.save_file({k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v for k, v in tensors.items()},
                 weights, metadata={"format": "pt"})
    return folder


def _zero3_run(model_dir, out):
    env = _env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = [sys.executable, "-m", "qwenvl.train.train_qwen",
           *_flags(model_dir, out, "--tune_mm_llm", "True", "--max_steps", "1", "--save_strategy", "no",
                   "--deepspeed", "scripts/zero3.json")]
    return run_command(cmd, env=env, timeout=600)


def test_stored_shape_reads_single_files_and_shard_indexes(tiny_model_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    model_dir = Path(tiny_model_dir("qwen3_vl_moe"))
    want = tuple(st.load_file(model_dir / "model.safetensors")[DOWN].shape)
    assert stored_shape(str(model_dir), "mlp.experts.down_proj") == want
    sharded = tmp_path / "sharded"
    AutoModelForImageTextToText.from_pretrained(model_dir).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert stored_shape(str(sharded), "mlp.experts.down_proj") == want
    assert stored_shape(str(sharded), "no.such.tensor") is None
    assert stored_shape(str(tmp_path), "mlp.experts.down_proj") is None  # no weights at all


def test_zero3_refuses_a_transformers5_layout_checkpoint_before_any_data_work(tiny_model_dir, tmp_path):
    """The tiny model is saved from a model built in memory: transformers 5's layout, as a fine-tuned output is."""
    out = tmp_path / "out"
    result = _zero3_run(tiny_model_dir("qwen3_vl_moe"), out)
    assert result.returncode == 2, result.stdout + result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "stores its MoE experts in transformers 5's own layout" in result.stderr
    assert "SHARDING=fsdp2" in result.stderr and "scripts/zero2.json" in result.stderr
    assert not out.exists()  # nothing written, no data work


@pytest.mark.slow
def test_the_released_layout_trains_under_zero3(tiny_model_dir, tmp_path):
    model_dir = _released_layout_copy(tiny_model_dir("qwen3_vl_moe"), tmp_path / "released")
    out = tmp_path / "out"
    result = _zero3_run(model_dir, out)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_transformers_zero3_loader_still_transposes_the_transformers5_layout(tiny_model_dir):
    """Why the refusal exists, on transformers' own loader: when this fails, transformers loads its own layout
    under ZeRO-3 and ``check_zero3_expert_layout`` can go."""
    script = (
        "import deepspeed\n"
        "from transformers import AutoModelForImageTextToText\n"
        "from transformers.integrations.deepspeed import HfDeepSpeedConfig\n"
        "deepspeed.init_distributed(dist_backend='gloo')\n"
        "keep = HfDeepSpeedConfig({'zero_optimization': {'stage': 3}, 'train_batch_size': 1})\n"
        "try:\n"
        f"    AutoModelForImageTextToText.from_pretrained({str(tiny_model_dir('qwen3_vl_moe'))!r})\n"
        "    print('LOADED')\n"
        "except RuntimeError as err:\n"
        "    print('REFUSED' if 'size mismatch' in str(err) and 'experts.down_proj' in str(err) else err)\n")
    env = _env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    result = run_command([sys.executable, "-c", script], env=env, timeout=600)
    assert "REFUSED" in result.stdout, result.stdout + result.stderr[-3000:]
