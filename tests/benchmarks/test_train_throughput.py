"""benchmarks/train_throughput.py on CPU: released parameter counts (meta device), configurations, a smoke run."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import train_throughput as tt
from tests.conftest import load_processor


@pytest.mark.parametrize("name,total,llm,vision", [
    ("3b", 3_754_622_976, 3_085_938_688, 668_684_288),
    ("7b", 8_292_166_656, 7_615_616_512, 676_550_144),
])
def test_released_architectures_have_the_released_parameter_counts(name, total, llm, vision):
    config = tt.released_config(name)
    tt.check_released_params(config, name)  # builds on the meta device: no memory
    from qwenvl.tools.make_tiny_model import model_class

    with torch.device("meta"):
        model = model_class("qwen2_5_vl")(config)
    assert tt.component_params(model) == (total, llm, vision)
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) == (name == "3b")
    v = config.vision_config
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.patch_size, v.window_size,
            list(v.fullatt_block_indexes), v.out_hidden_size, v.tokens_per_second) == \
        (32, 1280, 16, 3420, 14, 112, [7, 15, 23, 31], config.text_config.hidden_size, 2)
    assert config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert config.text_config.rope_parameters["rope_theta"] == 1e6


def test_wrong_architecture_is_caught():
    config = tt.released_config("3b")
    config.text_config.intermediate_size += 1
    with pytest.raises(AssertionError, match="released model has"):
        tt.check_released_params(config, "3b")


def test_model_dir_without_weights(tmp_path):
    from transformers import AutoConfig

    folder = tt.write_model_dir("3b", tmp_path / "m")
    config = AutoConfig.from_pretrained(folder)
    processor = load_processor(folder)
    tok = processor.tokenizer
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert config.text_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert not list(folder.glob("*.safetensors"))


def test_qwen3_5_released_configs_and_reduced_depth():
    nine = tt.released_config("qwen3_5_9b")
    text = nine.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim, text.intermediate_size, text.vocab_size) == (4096, 32, 16, 4, 256, 12288, 248320)
    assert text.layer_types[:4] == ["linear_attention"] * 3 + ["full_attention"]
    assert text.rope_parameters["mrope_section"] == [11, 11, 10] and nine.vision_config.out_hidden_size == 4096
    moe = tt.released_config("qwen3_5_35b_a3b", layers=12).text_config
    assert (moe.num_hidden_layers, moe.num_experts, moe.num_experts_per_tok, len(moe.layer_types)) == (12, 256, 8, 12)
    with pytest.raises(ValueError, match="multiple of 4"):
        tt.released_config("qwen3_5_35b_a3b", layers=10)


def test_parse_configs():
    parsed = tt.parse_configs("ours_padded_bs4, ours_flat_bs16,trl_bs4,ours_budget,trl_bs3,nope", 16)
    assert [(c.name, c.trainer, c.layout, c.batch, c.accumulation) for c in parsed[:4]] == [
        ("ours_padded_bs4", "ours", "padded", 4, 4), ("ours_flat_bs16", "ours", "flat", 16, 1),
        ("trl_bs4", "trl", "padded", 4, 4), ("ours_budget", "ours", "budget", 16, 1)]
    assert "does not divide" in parsed[4] and "unknown configuration" in parsed[5]


def test_generated_data_outlasts_every_configurations_steps():
    """No epoch boundary (a data-loader restart) inside the timed steps: a token-budget batch of
    the shortest samples takes max_tokens / MIN_SAMPLE_TOKENS of them per step."""
    args = tt.parse_cli(["--steps", "6", "--warmup", "3", "--max_tokens_per_batch", "16384"])
    fixed = tt.parse_configs("ours_flat_bs16,trl_bs16", 16)
    budget = tt.parse_configs("ours_flat_bs16,ours_budget", 16)
    assert tt.generated_samples(args, fixed) >= 9 * 16
    assert tt.generated_samples(args, budget) >= 9 * 16384 // tt.MIN_SAMPLE_TOKENS


def test_meter_counts_padded_and_flattened_batches_alike():
    meter = tt.Meter([7])
    # two samples of 3 and 2 tokens (one visual placeholder each), padded...
    padded = {"input_ids": torch.tensor([[7, 1, 2], [7, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
              "image_grid_thw": torch.tensor([[1, 2, 2], [1, 2, 2]])}
    # ...and flattened: 4 position rows, the text row restarting at 0 per sample
    flat = {"input_ids": torch.tensor([[7, 1, 2, 7, 3]]),
            "position_ids": torch.tensor([[0, 1, 2, 0, 1], [0] * 5, [0] * 5, [0] * 5])[:, None, :],
            "image_grid_thw": torch.tensor([[1, 2, 2], [1, 2, 2]])}
    meter.record(padded, 0)
    meter.record(flat, 1)
    a, samples_a, slots_a = meter.total(0, 1, None)
    b, samples_b, slots_b = meter.total(1, 2, None)
    assert a == b and (a.tokens, a.visual_tokens, a.pairs, a.patches) == (5, 2, 6 + 3, 8)
    assert a.chunk_tokens == 2 * 64  # each sample rounded up to a whole linear-attention chunk
    assert (samples_a, slots_a, samples_b, slots_b) == (2, 6, 2, 5)


def test_table_lists_every_row():
    rows = [{"config": "ours_flat_bs4", "status": "ok", "batch": 4, "accumulation": 4, "nominal_samples_per_step": 16,
             "samples_per_step": 16.0, "step_s": 1.2, "samples_per_s": 13.3, "text_tokens_per_s": 3000.0,
             "visual_tokens_per_s": 2500.0, "peak_gib": 60.1, "mfu": 0.123},
            {"config": "trl_bs16", "status": "OOM", "error": "CUDA out of memory", "batch": 16, "accumulation": 1,
             "nominal_samples_per_step": 16}]
    text = tt.table(rows)
    assert "4x4=16" in text and "12.3" in text and "OOM (CUDA out of memory)" in text and "16x1=16" in text
    assert text.splitlines()[0].split()[:2] == ["config", "samples/step"]


@pytest.mark.slow
def test_cpu_smoke_run(tmp_path, tiny_model_dir, capsys):
    """The whole benchmark on CPU with a tiny model: ours and TRL each train and are measured."""
    pytest.importorskip("trl")
    output = tmp_path / "r.json"
    rows = tt.main(["--model_dir", str(tiny_model_dir("qwen2_5_vl")), "--device", "cpu", "--steps", "1",
                    "--warmup", "1", "--samples_per_step", "1", "--configs", "ours_flat_bs1,trl_bs1",
                    "--num_workers", "0", "--output", str(output)])
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    ours, trl = rows
    for r in rows:
        assert r["timed_steps"] == 1 and r["samples_per_step"] == 1 and r["step_s"] > 0
        assert r["visual_tokens_per_s"] > 0 and r["text_tokens_per_s"] > 0 and r["loss"] > 0
    # the same parameters train, the same sample in both, so the same tokens and the same model FLOPs
    assert ours["trainable_params"] == trl["trainable_params"] > 0
    assert ours["tokens_per_sample"] == trl["tokens_per_sample"]
    assert ours["model_tflops_per_step"] == trl["model_tflops_per_step"] > 0
    saved = json.loads(output.read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["environment"]["trl"]
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("trl_bs1")  # the table is printed last
