"""Merge a LoRA checkpoint into its base model and write a plain model directory.

    python -m qwenvl.tools.merge_lora --checkpoint out/checkpoint-500 --output out/merged [--base DIR]

The output holds safetensors weights, config, generation config, the processor and
its chat template, so ``AutoModelForImageTextToText`` / ``AutoProcessor`` load it
without peft.  The base model is the one recorded in the adapter config
(``base_model_name_or_path``) unless ``--base`` names another; the processor comes
from the checkpoint (training saves it there with the training pixel settings), or
from the base when the checkpoint has none.  Modules trained fully next to LoRA
(``modules_to_save``: merger, vision tower) replace the base ones.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def merge_lora(checkpoint: str | Path, output: str | Path, base: str | None = None, dtype: str = "auto",
               overwrite: bool = False) -> Path:
    """Merge the adapter in ``checkpoint`` into its base model and save the result in ``output``."""
    import torch
    from peft import PeftModel
    from transformers import AutoProcessor

    from qwenvl.train.model import model_class_for, model_type_of

    checkpoint, output = Path(checkpoint), Path(output)
    adapter_config = checkpoint / "adapter_config.json"
    if not adapter_config.is_file():
        if (checkpoint / "config.json").is_file():
            _fail(f"{checkpoint} is a full model checkpoint (config.json, no adapter_config.json): nothing to "
                  "merge, load it directly.")
        _fail(f"{checkpoint} has no adapter_config.json: pass a directory written by a --lora_enable run.")
    if output.exists() and any(output.iterdir()) and not overwrite:
        _fail(f"{output} exists and is not empty; choose another --output or pass --overwrite.")
    base = base or json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    if not base:
        _fail(f"{adapter_config} names no base model; pass --base DIR.")

    cls = model_class_for(model_type_of(base))
    torch_dtype = DTYPES[dtype] if dtype == "auto" else getattr(torch, DTYPES[dtype])
    model = cls.from_pretrained(base, dtype=torch_dtype)
    merged = PeftModel.from_pretrained(model, str(checkpoint)).merge_and_unload()
    merged.config.use_cache = True
    output.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output, safe_serialization=True)
    has_processor = (checkpoint / "preprocessor_config.json").is_file() or (checkpoint / "processor_config.json").is_file()
    AutoProcessor.from_pretrained(str(checkpoint) if has_processor else base).save_pretrained(output)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="directory with adapter_config.json (a LoRA run's "
                                                            "output_dir or one of its checkpoint-N)")
    parser.add_argument("--output", required=True, help="directory to write the merged model into")
    parser.add_argument("--base", default=None, help="base model (default: the adapter config's "
                                                     "base_model_name_or_path)")
    parser.add_argument("--dtype", default="auto", choices=sorted(DTYPES),
                        help="dtype of the merged weights (auto: the base checkpoint's)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    args = parser.parse_args(argv)
    from qwenvl.train.arguments import ConfigError

    try:
        path = merge_lora(args.checkpoint, args.output, args.base, args.dtype, args.overwrite)
    except ConfigError as err:
        _fail(str(err))
    print(f"merged model written to {path}")


if __name__ == "__main__":
    main()
