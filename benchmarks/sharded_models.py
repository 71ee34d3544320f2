"""Random-weight model folders of released architectures (optionally at reduced depth) for the
multi-GPU benchmarks: the config, the family's processor (real tokenizer) and bf16 weights.

    python -m benchmarks.sharded_models --name 7b --output /tmp/m7b [--layers 7]

Architectures (config.json of the released checkpoints; the 7B's counts are asserted in
``train_throughput.check_released_params``):

* ``7b``: Qwen2.5-VL-7B-Instruct (28 layers of width 3584).
* ``32b``: Qwen2.5-VL-32B-Instruct: 64 layers of width 5120, MLP 27648, 40 query / 8 key-value
  heads, untied 152064-token head, the 7B's vision tower with a 5120-wide merger output.
* ``30b_a3b``: Qwen3-VL-30B-A3B-Instruct: 48 MoE layers of width 2048, 128 experts of 768
  with 8 active, 32 query / 4 key-value heads of 128, untied 151936-token head, 27-block
  vision tower of width 1152 with deepstack mergers after blocks 8, 16, 24.

``layers`` keeps the first N decoder layers (every layer has the same shape, so tokens/s per
layer and the sharded-communication pattern are those of the full model; the memory is not).
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

QWEN3_VL_30B_A3B_TEXT = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                             num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32,
                             num_key_value_heads=4, head_dim=128, vocab_size=151936, decoder_sparse_step=1,
                             mlp_only_layers=[], norm_topk_prob=True, max_position_embeddings=262144,
                             rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                              "mrope_section": [24, 20, 20], "mrope_interleaved": True})
QWEN3_VL_30B_A3B_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3,
                               patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048,
                               num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
                               hidden_act="gelu_pytorch_tanh")
QWEN2_5_VL_32B_TEXT = dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                           num_key_value_heads=8, vocab_size=152064, max_window_layers=64)
NAMES = ("7b", "32b", "30b_a3b")


def model_type_of(name: str) -> str:
    return "qwen3_vl_moe" if name == "30b_a3b" else "qwen2_5_vl"


def build_config(name: str, token_ids: dict, layers: int | None = None):
    """The released config of ``name`` with the tokenizer's special ids, at ``layers`` decoder layers."""
    from transformers import AutoConfig

    from benchmarks import train_throughput as tt

    ids = dict(token_ids)
    bos, eos = ids.pop("bos_token_id"), ids.pop("eos_token_id")
    if name == "30b_a3b":
        text = dict(QWEN3_VL_30B_A3B_TEXT, bos_token_id=bos, eos_token_id=eos)
        config = AutoConfig.for_model("qwen3_vl_moe", text_config=text, vision_config=dict(QWEN3_VL_30B_A3B_VISION),
                                      tie_word_embeddings=False, **ids)
    elif name == "32b":
        text = dict(tt._TEXT, **QWEN2_5_VL_32B_TEXT, tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos)
        vision = dict(tt._VISION, intermediate_size=3456, out_hidden_size=QWEN2_5_VL_32B_TEXT["hidden_size"])
        config = AutoConfig.for_model("qwen2_5_vl", text_config=text, vision_config=vision, tie_word_embeddings=False,
                                      **ids)
    elif name == "7b":
        config = tt.released_config("7b", dict(token_ids))
    else:
        raise ValueError(f"name must be one of {', '.join(NAMES)}, not {name!r}")
    if layers is not None:
        config = copy.deepcopy(config)
        text = config.text_config
        # layer_types lists every layer (transformers validates its length on load): keep the first N
        if getattr(text, "layer_types", None) is not None:
            text.__dict__["layer_types"] = list(text.layer_types)[:int(layers)]
        text.__dict__["num_hidden_layers"] = int(layers)
        for key in ("max_window_layers",):
            if hasattr(config.text_config, key):
                setattr(config.text_config, key, int(layers))
    return config


def parameter_count(config) -> tuple[int, int]:
    """(total parameters, active parameters per token) of ``config``, built on the meta device."""
    from qwenvl.hf_internals import build_from_config
    from qwenvl.train.model import model_class_for

    with torch.device("meta"):
        model = build_from_config(model_class_for(config.model_type), copy.deepcopy(config), dtype=torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    text = config.text_config
    experts = getattr(text, "num_experts", None)
    if not experts:
        return total, total
    per_expert = 3 * text.hidden_size * text.moe_intermediate_size
    inactive = text.num_hidden_layers * (experts - text.num_experts_per_tok) * per_expert
    return total, total - inactive


def write_model(name: str, output: str | Path, layers: int | None = None, device: str = "cuda") -> Path:
    """Write the folder: config, processor and random bf16 weights (built on ``device``)."""
    from qwenvl.hf_internals import build_from_config
    from qwenvl.tools.make_tiny_model import build_processor, special_token_ids, write_family_tokenizer
    from qwenvl.train.model import model_class_for

    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    model_type = model_type_of(name)
    write_family_tokenizer(model_type, folder)
    processor = build_processor(model_type, folder)
    config = build_config(name, special_token_ids(processor.tokenizer), layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = build_from_config(model_class_for(model_type), config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, choices=NAMES)
    parser.add_argument("--output", required=True)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    folder = write_model(args.name, args.output, args.layers, args.device)
    print(f"wrote {args.name} ({args.layers or 'all'} layers) to {folder}", flush=True)


if __name__ == "__main__":
    main()
