"""Show one training sample as the model will see it.

    python -m qwenvl.data.preview --dataset_use demo_shapes --model_name_or_path DIR [--index 3] [--json]
        [--draw_dir DIR]

Takes the same data flags as training (pixel bounds, video sampling,
``--model_max_length``, ``--enable_thinking``) and renders the sample through the same
code; on Qwen3.5/3.6 it says whether each sample trains in thinking mode.  The text
view marks trained tokens with ``[[ ]]`` (and colour on a terminal) and collapses
runs of image/video placeholders; ``--json`` prints the tensors as lists.
``--draw_dir DIR`` also writes each image of the sample as the model sees it (resized
to its grid) with the boxes and points of the trained text drawn on it (boxes in
red, points as red dots), so a person can check a grounding dataset by looking.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from qwenvl.data.arguments import DataArguments, parse_tool_flags
from qwenvl.data.errors import DataError
from qwenvl.data.media.read import open_image
from qwenvl.data.render.grounding import convert_values, place_coordinates
from qwenvl.data.render.prompt import template_messages


@dataclass
class PreviewArguments:
    model_name_or_path: str = field(metadata={"help": "Checkpoint directory whose processor renders the sample."})
    index: int = field(default=0, metadata={"help": "Which item of the mixture to show."})
    json: bool = field(default=False, metadata={"help": "Print input_ids, labels, position_ids and grids as JSON."})
    model_max_length: int | None = field(default=None, metadata={"help": "As in training."})
    seed: int = field(default=42, metadata={"help": "Mixture seed, as --seed in training."})
    draw_dir: str | None = field(default=None, metadata={
        "help": "Write each image as the model sees it (resized) with the trained boxes/points drawn, into DIR."})


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


def images_as_seen(sample: dict, image_processor) -> list:
    """The images of a rendered sample as the model sees them, rebuilt from ``pixel_values``.

    Undoes the processor's patch layout (transformers' ``Qwen2VLImageProcessor.patchify``:
    rows of merge-size blocks, each patch repeated ``temporal_patch_size`` times) and its
    normalisation, so what comes back is the resized image itself, not a re-resize.
    """
    if "pixel_values" not in sample:
        return []
    p, m, t = image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size
    mean = np.asarray(image_processor.image_mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(image_processor.image_std, dtype=np.float32).reshape(3, 1, 1)
    pixels = sample["pixel_values"].float().numpy()
    out, row = [], 0
    for _, gh, gw in sample["image_grid_thw"].tolist():
        block = pixels[row:row + gh * gw].reshape(gh // m, gw // m, m, m, 3, t, p, p)[:, :, :, :, :, 0]
        image = block.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p)  # (C, H, W)
        image = np.clip((image * std + mean) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        out.append(Image.fromarray(image.transpose(1, 2, 0)))
        row += gh * gw
    return out


def draw_trained_coordinates(conversation, sample: dict, renderer) -> list:
    """Each image of ``conversation`` resized as the model sees it, with the sample's boxes/points drawn.

    The images are rebuilt from the sample's ``pixel_values`` (``images_as_seen``), so a
    sample shrunk to fit ``--model_max_length`` is drawn as shrunk; the coordinates are
    the ones in the trained text, read back from the family's convention into pixels
    of that image.
    """
    _, refs, _ = template_messages(conversation)
    if not refs:
        return []
    images = [open_image(ref, origin=conversation.origin) for ref in refs]
    patch = renderer.processor.image_processor.patch_size
    resized = [(int(w) * patch, int(h) * patch) for _, h, w in sample["image_grid_thw"].tolist()]
    grounding = renderer.grounding
    originals = [image.size for image in images]
    trained = grounding.training_conversation(conversation, originals, resized)
    canvases = images_as_seen(sample, renderer.processor.image_processor)
    convention = grounding.convention or "abs_resized"
    for placed in place_coordinates(trained):
        k = placed.image
        pixels = convert_values(placed.coordinates.values, convention, "abs_resized", originals[k], resized[k])
        draw = ImageDraw.Draw(canvases[k])
        if placed.coordinates.kind == "box":
            x1, y1, x2, y2 = pixels
            draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=(255, 0, 0), width=1)
        else:
            x, y = pixels
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(255, 0, 0))
    return canvases


def preview(argv: list[str] | None = None) -> str:
    """Render the chosen sample and return what ``main`` prints."""
    # local: --help and flag errors answer without importing torch and the renderer
    from qwenvl.data.dataset import make_supervised_data_module, sample_token_counts

    data_args, args = parse_tool_flags((DataArguments, PreviewArguments), argv)
    from qwenvl.train.model import check_model_dir, read_config, read_processor

    check_model_dir(args.model_name_or_path)  # an adapter folder, no config.json: a message, not a traceback
    processor = read_processor(args.model_name_or_path)
    config = read_config(args.model_name_or_path)
    module = make_supervised_data_module(processor, data_args, config, args.model_max_length, args.seed)
    dataset = module["train_dataset"]
    if not 0 <= args.index < len(dataset):
        raise DataError(f"--index {args.index} is outside the mixture of {len(dataset)} samples.")
    # Show why a bad sample is bad, whatever --bad_sample_policy (skip would hand back None).
    dataset.bad_sample_policy = "error"
    item = dataset[args.index]
    samples = item["pack"] if "pack" in item else [item]
    if args.json:
        return json.dumps([sample_as_json(s) for s in samples] if "pack" in item else sample_as_json(item))
    lines = [f"# {dataset.origin(args.index)}  (item {args.index} of {len(dataset)})"]
    think_blocks = dataset.renderer.chat.rules.think_blocks
    if think_blocks:
        conversations = dataset.conversations(args.index)
        first = conversations[0] if isinstance(conversations, list) else conversations
        # A dataset's own enable_thinking (dictionary) wins over the flag for its records.
        mode = (f"enable_thinking {first.thinking} (dataset '{dataset.entries[dataset.mixture[args.index][0]].spec.name}'"
                f" in the dictionary; --enable_thinking {data_args.enable_thinking} for the others)"
                if first.thinking else f"--enable_thinking {data_args.enable_thinking}")
        lines.append(mode + (
            f"; the record trains as {len(samples)} samples, one per reasoning turn" if len(samples) > 1
            and not isinstance(conversations, list) else ""))
    if args.draw_dir:
        os.makedirs(args.draw_dir, exist_ok=True)
        conversations = dataset.conversations(args.index)
        conversations = conversations if isinstance(conversations, list) else [conversations]
        for k, (conversation, sample) in enumerate(zip(conversations, samples)):
            for i, canvas in enumerate(draw_trained_coordinates(conversation, sample, dataset.renderer)):
                path = os.path.join(args.draw_dir, f"item{args.index}_sample{k}_image{i}.png")
                canvas.save(path)
                lines.append(f"drawn: {path} ({canvas.size[0]}x{canvas.size[1]}, as the model sees it)")
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
    from qwenvl.train.arguments import ConfigError

    try:
        print(preview(argv))
    except (DataError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
