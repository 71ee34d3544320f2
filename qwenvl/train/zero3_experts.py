"""Qwen3-VL-MoE expert weights under DeepSpeed ZeRO-3: which stored layout transformers can load there.

transformers 5 keeps ``qwen3_vl_moe``'s routed experts as ``gate_up_proj [experts, 2 x intermediate,
hidden]`` and ``down_proj [experts, hidden, intermediate]``; the released checkpoints store them
transposed (``[experts, hidden, 2 x intermediate]``, ``[experts, intermediate, hidden]``).  Its loading
rule (``conversion_mapping.py``, "qwen3_vl_moe": ``Transpose(1, 2, check_dims=True)``;
``core_model_loading.py`` ``Transpose.convert``) transposes a stored tensor unless its shape already
equals the model parameter's, so both layouts load, and ``save_pretrained`` of a model that was not
partitioned writes the transformers 5 layout (measured, 5.23).

Under ZeRO-3 the model's parameters are partitioned placeholders of shape ``[0]`` when that rule runs
(``integrations/deepspeed.py`` ``_apply_weight_conversions_to_state_dict``), so it always transposes:
released checkpoints (and ones saved under ZeRO-3, which come out in the released layout) load right,
while a checkpoint in the transformers 5 layout (one fine-tuned here with FSDP2, ZeRO-2 or DDP, then
trained further with ZeRO-3) stops with "size mismatch for ...experts.down_proj" deep inside
``from_pretrained``, after the data work.  ``check_zero3_expert_layout`` tells that case at start-up
from the safetensors headers.  Where a shape cannot tell the layouts apart (``hidden ==
intermediate``), nothing is said.
"""
from __future__ import annotations

import json
import os

from .arguments import ConfigError

_DOWN_PROJ = "mlp.experts.down_proj"


def stored_shape(folder: str, suffix: str) -> tuple[int, ...] | None:
    """The shape, from the safetensors headers of ``folder``, of the first tensor whose name ends with
    ``suffix``; None when there is no safetensors weight or no such tensor."""
    from safetensors import safe_open

    from .weights_files import SAFE_WEIGHTS, SAFE_WEIGHTS_INDEX

    index = os.path.join(folder, SAFE_WEIGHTS_INDEX)
    if os.path.isfile(os.path.join(folder, SAFE_WEIGHTS)):
        files = {None: SAFE_WEIGHTS}
    elif os.path.isfile(index):
        with open(index) as f:
            files = {name: shard for name, shard in json.load(f)["weight_map"].items() if name.endswith(suffix)}
    else:
        return None
    for shard in dict.fromkeys(files.values()):
        with safe_open(os.path.join(folder, shard), framework="pt") as weights:
            for name in weights.keys():
                if name.endswith(suffix):
                    return tuple(weights.get_slice(name).get_shape())
    return None


def check_zero3_expert_layout(model_name_or_path: str, config, cache_dir: str | None = None) -> None:
    """ConfigError, before any data work, when ZeRO-3 is on and the ``qwen3_vl_moe`` checkpoint stores its
    experts in the layout transformers' ZeRO-3 loader transposes wrongly (see the module docstring)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from .weights_files import snapshot_folder

    if config.model_type != "qwen3_vl_moe" or not is_deepspeed_zero3_enabled():
        return
    folder = os.path.expanduser(model_name_or_path)
    if not os.path.isdir(folder):
        folder = snapshot_folder(model_name_or_path, cache_dir)
        if folder is None:
            return
    text = config.text_config
    hidden, intermediate = text.hidden_size, text.moe_intermediate_size
    shape = stored_shape(folder, _DOWN_PROJ)
    if hidden == intermediate or shape is None or tuple(shape[1:]) != (hidden, intermediate):
        return
    raise ConfigError(
        f"--model_name_or_path {model_name_or_path} stores its MoE experts in transformers 5's own layout "
        f"({_DOWN_PROJ} {list(shape)}: [experts, hidden, intermediate]), as transformers saves a Qwen3-VL-MoE "
        "trained without ZeRO-3. Under DeepSpeed ZeRO-3, transformers 5.23 transposes these weights anyway when "
        "loading (its layout check compares with the empty partitioned parameter), and the load would stop with "
        "a size mismatch. Released checkpoints, and ones saved under ZeRO-3, load. Fix: train this checkpoint with "
        "FSDP2 (SHARDING=fsdp2, the default of scripts/sft_qwen3_30b_a3b.sh; or --fsdp \"full_shard auto_wrap\" "
        "--fsdp_config scripts/fsdp2.json) or ZeRO-2 (--deepspeed scripts/zero2.json).")
