"""Show one training sample as the model will see it.

    python -m qwenvl.data.preview --dataset_use demo_shapes --model_name_or_path DIR [--index 3] [--json]

Takes the same data flags as training (pixel bounds, video sampling,
``--model_max_length``, ``--enable_thinking``) and renders the sample through the same
code; on Qwen3.5/3.6 it says whether each sample trains in thinking mode.  The text
view marks trained tokens with ``[[ ]]`` (and colour on a terminal) and collapses
runs of image/video placeholders; ``--json`` prints the tensors as lists.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from transformers import AutoConfig, AutoProcessor, HfArgumentParser

from .arguments import DataArguments
from .errors import DataError


@dataclass
class PreviewArguments:
    model_name_or_path: str = field(metadata={"help": "Checkpoint directory whose processor renders the sample."})
    index: int = field(default=0, metadata={"help": "Which item of the mixture to show."})
    json: bool = field(default=False, metadata={"help": "Print input_ids, labels, position_ids and grids as JSON."})
    model_max_length: int | None = field(default=None, metadata={"help": "As in training."})
    seed: int = field(default=42, metadata={"help": "Mixture seed, as --seed in training."})


def _segments(ids: list[int], trained: list[bool], tokenizer, pads: set[int]):
    """Group tokens into (text, trained) runs, collapsing placeholder runs to 'token x N'."""
    out, i = [], 0
    while i < len(ids):
        j = i
        if ids[i] in pads:
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            out.append((f"{tokenizer.convert_ids_to_tokens(ids[i])}x{j - i}", trained[i]))
        else:
            while j < len(ids) and ids[j] not in pads and trained[j] == trained[i]:
                j += 1
            out.append((tokenizer.decode(ids[i:j]), trained[i]))
        i = j
    return out


def render_text(sample: dict, tokenizer, colour: bool = False) -> str:
    """The sample's text with trained spans marked ``[[...]]`` (green on a terminal)."""
    pads = {tokenizer.convert_tokens_to_ids("<|image_pad|>"), tokenizer.convert_tokens_to_ids("<|video_pad|>")}
    ids = sample["input_ids"].tolist()
    trained = (sample["labels"] != -100).tolist()
    parts = []
    for text, is_trained in _segments(ids, trained, tokenizer, pads):
        if is_trained:
            parts.append(f"\033[32m[[{text}]]\033[0m" if colour else f"[[{text}]]")
        else:
            parts.append(text)
    return "".join(parts)


def thinking_mode(sample: dict, tokenizer) -> str:
    """How the sample's last answer trains on Qwen3.5/3.6, read off its labels."""
    close = tokenizer.convert_tokens_to_ids("</think>")
    if bool((sample["labels"] == close).any()):
        return "thinking (the think block is trained)"
    return "non-thinking (the empty think block is prompt)"


def sample_as_json(sample: dict) -> dict:
    """The sample's tensors as plain lists (pixel values left out: only their shape)."""
    out = {}
    for key in ("input_ids", "labels", "position_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts"):
        if key in sample:
            out[key] = sample[key].tolist()
    for key in ("pixel_values", "pixel_values_videos"):
        if key in sample:
            out[f"{key}_shape"] = list(sample[key].shape)
    return out


def preview(argv: list[str] | None = None) -> str:
    """Render the chosen sample and return what ``main`` prints."""
    from .dataset import make_supervised_data_module, sample_token_counts

    data_args, args = HfArgumentParser((DataArguments, PreviewArguments)).parse_args_into_dataclasses(argv)
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    config = AutoConfig.from_pretrained(args.model_name_or_path)
    module = make_supervised_data_module(processor, data_args, config, args.model_max_length, args.seed)
    dataset = module["train_dataset"]
    if not 0 <= args.index < len(dataset):
        raise DataError(f"--index {args.index} is outside the mixture of {len(dataset)} samples.")
    item = dataset[args.index]
    samples = item["pack"] if "pack" in item else [item]
    if args.json:
        return json.dumps([sample_as_json(s) for s in samples] if "pack" in item else sample_as_json(item))
    lines = [f"# {dataset.origin(args.index)}  (item {args.index} of {len(dataset)})"]
    think_blocks = dataset.renderer.chat.rules.think_blocks
    if think_blocks:
        lines.append(f"--enable_thinking {data_args.enable_thinking}" + (
            f"; the record trains as {len(samples)} samples, one per reasoning turn" if len(samples) > 1
            and not isinstance(dataset.conversations(args.index), list) else ""))
    for sample in samples:
        if think_blocks:
            lines.append(f"mode: {thinking_mode(sample, processor.tokenizer)}")
        counts = sample_token_counts(sample, dataset.renderer)
        lines.append(render_text(sample, processor.tokenizer, colour=sys.stdout.isatty()))
        lines.append(f"tokens: {counts['tokens']} (text {counts['text_tokens']}, visual {counts['visual_tokens']}), "
                     f"trained: {counts['trained_tokens']}")
        for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts"):
            if key in sample:
                lines.append(f"{key}: {sample[key].tolist()}")
        pos = sample["position_ids"]
        lines.append("position ids (t, h, w): " + ", ".join(
            f"{name} {int(pos[k].min())}..{int(pos[k].max())}" for k, name in enumerate("thw")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    try:
        print(preview(argv))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
