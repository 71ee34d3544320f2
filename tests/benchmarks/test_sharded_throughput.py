"""benchmarks/sharded_throughput.py on CPU: its commands parse, logs are read, model configs count right."""
from __future__ import annotations

import pytest

from benchmarks import sharded_throughput as bench
from benchmarks.sharded_models import build_config, parameter_count
from qwenvl.tools.make_tiny_model import build_processor, special_token_ids, write_family_tokenizer
from qwenvl.train.arguments import parse_args


@pytest.mark.parametrize("name", bench.RUNS)
def test_every_run_is_a_valid_training_command(name, tmp_path):
    for label, cmd, _ in bench.run_plan(name, steps=8):
        assert cmd[0] == "bash"
        if cmd[1].endswith("launch.sh"):
            flags = [f for f in cmd[2:]]
            if "--deepspeed" in flags:
                i = flags.index("--deepspeed")
                del flags[i:i + 2]
            training = parse_args(["--model_name_or_path", "Qwen/x", "--output_dir", str(tmp_path), *flags]).training
            assert training.compile_layers and not training.gradient_checkpointing, label
            assert bool(training.fsdp) == ("fsdp2" in label or name in ("32b_quarter", "30b_a3b")), label


def test_step_logs_are_parsed_and_summarised():
    lines = ["noise\n", "{'loss': '11.86', 'grad_norm': '7.3', 'tokens_per_second': '1000', 'epoch': '0.1'}\n",
             "{'loss': '11.5', 'tokens_per_second': '3000'}\n", "{'loss': '11.4', 'tokens_per_second': '5000'}\n",
             "{'train_runtime': '6.7'}\n"]
    logs = bench.parse_logs(lines)
    assert [e["loss"] for e in logs] == [11.86, 11.5, 11.4]
    summary = bench.summarise({"logs": logs, "peak_mib": {0: 2048, 1: 4096}}, gpus=2, warmup=1,
                              active_matmul=10**9, peak_flops=6e12)
    assert summary["tokens_per_s_per_gpu"] == 2000.0  # median of 3000 and 5000, over 2 GPUs
    assert summary["mfu_pct"] == 200.0 and summary["peak_gib"] == 4.0


@pytest.mark.parametrize("name, layers, total, active", [
    ("7b", None, 8_292_166_656, 8_292_166_656),
    ("32b", None, 33_452_718_336, 33_452_718_336),
    ("30b_a3b", None, 31_070_754_032, 3_891_664_112),
    ("30b_a3b", 12, 8_638_410_992, 1_843_638_512),
])
def test_architectures_have_the_released_sizes(name, layers, total, active, tmp_path):
    model_type = "qwen3_vl_moe" if name == "30b_a3b" else "qwen2_5_vl"
    write_family_tokenizer(model_type, tmp_path)
    config = build_config(name, special_token_ids(build_processor(model_type, tmp_path).tokenizer), layers)
    assert parameter_count(config) == (total, active)
