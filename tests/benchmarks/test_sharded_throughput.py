"""benchmarks/sharded_throughput.py on CPU: its commands parse, logs are read, model configs count right."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks import sharded_throughput as bench
from benchmarks.sharded_models import build_config, parameter_count
from qwenvl.tools.make_tiny_model import build_processor, special_token_ids, write_family_tokenizer
from qwenvl.train.arguments import parse_args


@pytest.mark.parametrize("name", [r for r in bench.RUNS if r != "nccl"])
def test_every_run_is_a_valid_training_command(name, tmp_path):
    for label, cmd, _ in bench.run_plan(name, steps=8):
        assert cmd[0] in (bench.RECIPE, bench.BENCH)
        if cmd[0] == bench.BENCH:
            cmd = bench.expand_command(cmd, 2, Path("Qwen/x"), "data", tmp_path / "out", label)
            assert cmd[cmd.index("-m") + 1] == "torch.distributed.run" and "benchmarks.profiled_train" in cmd
            flags = cmd[cmd.index("benchmarks.profiled_train") + 1:]
            i = flags.index("--bf16")
            assert flags[i:i + 4] == ["--bf16", "True", "--fp16", "False"]  # as scripts/launch.sh on GPUs
            del flags[i:i + 2]  # (no GPU here)
            if "--deepspeed" in flags:
                i = flags.index("--deepspeed")
                del flags[i:i + 2]
            training = parse_args(["--output_dir", str(tmp_path), *flags]).training
            assert training.compile_layers and not training.gradient_checkpointing, label
            assert bool(training.fsdp) == ("fsdp2" in label or name in ("32b_quarter", "30b_a3b")), label
            if name == "fsdp2_fused_prev":  # the previous settings, for attribution in the same run
                assert training.fsdp_config["reduce_dtype"] == "float32"
                assert training.fsdp_config["replicate_frozen_vision"] is False
            if label == "fsdp2_fp32_l7":  # the control: float32 reduction, same 20 steps as ddp_l7
                assert training.fsdp_config["reduce_dtype"] == "float32" and training.max_steps == 20


def test_profile_summary_separates_exposed_communication():
    """Two streams: a 10 ms matmul, an all-gather 5-12 ms (3 ms exposed after the matmul), 2 ms idle, a copy."""
    from benchmarks.profiled_train import summarise_trace

    def kernel(name, ts, dur, stream):
        return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}

    trace = {"traceEvents": [kernel("sm90_xmma_gemm_bf16", 0, 10_000, 7),
                             kernel("ncclDevKernel_AllGather_RING_LL", 5_000, 8_000, 20),
                             kernel("elementwise_copy", 15_000, 1_000, 7),
                             {"cat": "gpu_user_annotation", "name": "FSDP::all_gather (layers.0)", "ts": 5_000,
                              "dur": 8_000}]}
    summary = summarise_trace(trace, wall_ms=20.0)
    assert summary["gpu_span_ms"] == 16.0 and summary["gpu_busy_ms"] == 14.0 and summary["gpu_idle_ms"] == 2.0
    assert summary["nccl_busy_ms"] == 8.0 and summary["nccl_exposed_ms"] == 3.0
    assert summary["kernel_ms_by_class"] == {"matmul": 10.0, "nccl_all_gather": 8.0, "copy_cast": 1.0}
    assert summary["annotation_gpu_ms"] == {"FSDP::all_gather": 8.0}


def test_loss_curves_are_compared_step_by_step_with_the_reference_run():
    runs = {"ddp_l7": {"losses": [10.0, 8.0, 4.0]}, "fsdp2_l7": {"losses": [10.1, 8.0, 4.2]},
            "fsdp2_fp32_l7": {"losses": [10.0, 8.0, 4.0]}, "sft_7b": {"losses": [9.0, 7.0]},
            "crashed": {"losses": [10.0, None, 4.0]}}
    diff = bench.loss_differences(runs, "ddp_l7")
    assert set(diff) == {"fsdp2_l7", "fsdp2_fp32_l7"}  # other lengths and gaps are not comparable
    assert diff["fsdp2_l7"]["max"] == pytest.approx(0.05) and diff["fsdp2_l7"]["max_step"] == 3
    assert diff["fsdp2_l7"]["median"] == pytest.approx(0.01)
    assert diff["fsdp2_fp32_l7"]["max"] == 0.0
    assert bench.loss_differences({"fsdp2_l7": runs["fsdp2_l7"]}, "ddp_l7") == {}


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


def _recipe_env(tmp_path, **extra):
    import os

    return dict(os.environ, MODEL_PATH="Qwen/x", DATASETS="data", OUTPUT_DIR=str(tmp_path / "out"), PRECISION="bf16",
                NPROC_PER_NODE="2", **extra)


def test_recipe_runs_take_the_recipes_own_command_through_the_profiled_trainer(tmp_path):
    """The sft_7b run is what `bash scripts/sft_7b.sh` runs (its DRY_RUN command), with train_qwen.py
    swapped for benchmarks.profiled_train, and a variant's flags and environment on top."""
    (label, cmd, env), = bench.planned_runs("fused", 8, {"fused": ("sft_7b_fsdp2", {"BUDGET_ACCUM_STEPS": "2"},
                                                                    ["--optim", "adamw_torch_fused"])})
    assert label == "fused" and env == {"SHARDING": "fsdp2", "BUDGET_ACCUM_STEPS": "2"}
    full = bench.recipe_command(cmd, _recipe_env(tmp_path, **env))
    assert full[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--nproc_per_node" in full
    flags = full[full.index("benchmarks.profiled_train") + 1:]
    assert full[full.index("benchmarks.profiled_train") - 1] == "-m" and not any("train_qwen" in w for w in full)
    assert flags[-2:] == ["--optim", "adamw_torch_fused"]  # the variant's flags come last
    i = flags.index("--bf16")
    assert flags[i:i + 4] == ["--bf16", "True", "--fp16", "False"]  # PRECISION=bf16, as on the GPUs
    del flags[i:i + 2]  # (no GPU here)
    args = parse_args(["--output_dir", str(tmp_path), *flags]).training
    assert args.optim == "adamw_torch_fused" and args.fsdp and args.compile_layers and args.gradient_accumulation_steps == 2
    assert args.max_steps == 8 and args.learning_rate == 2e-7  # the recipe's own learning rate


@pytest.mark.parametrize("spec, error", [("x", "expected LABEL=RUN"), ("x=", "expected LABEL=RUN"),
                                         ("x=nope --a b", "unknown run 'nope'")])
def test_a_malformed_variant_is_refused_by_name(spec, error):
    with pytest.raises(ValueError, match=error):
        bench.parse_variant(spec)


def test_variant_words_split_into_environment_and_flags():
    assert bench.parse_variant("v=sft_7b SHARDING=fsdp2 --optim adamw_torch_fused --max_pixels 200704") == (
        "v", "sft_7b", {"SHARDING": "fsdp2"}, ["--optim", "adamw_torch_fused", "--max_pixels", "200704"])
