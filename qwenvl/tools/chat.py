"""Ask a checkpoint one question, with the prompt built exactly as training renders it.

    python -m qwenvl.tools.chat --model out/run [--base DIR] [--image a.png ...] [--video v.mp4] \\
        --prompt "What colour is the shape?" [--system TEXT] [--max_new_tokens 128]

``--model`` is a full or merged checkpoint (``config.json``), or a LoRA adapter
(``adapter_config.json``): its base is then loaded from the adapter config's
``base_model_name_or_path`` (or ``--base``), the adapter applied with peft and merged.
The processor and chat template come from ``--model`` (training saves them there,
with its pixel and frame settings), else from the base.

The prompt is the training renderer's own rendering of the conversation
(``SampleRenderer.encode(..., add_generation_prompt=True)``): same chat template,
same media loading and video sampling, same processor call.  Its ``input_ids`` are
therefore the training sample's ids up to and including ``<|im_start|>assistant\\n``.
Media go in front of the text as ``<image>\\n`` / ``<video>\\n`` (the layout of
LLaVA-style records) unless ``--prompt`` places them with ``<image>``/``<video>`` tags.

Boxes and points: ``--bbox_format`` (abs_original, abs_resized, rel_1, rel_1000) says
which coordinates the user works in.  Boxes in ``--prompt`` are then converted into the
family's coordinates exactly as training converts a dataset declared with that format,
and boxes in the answer are converted back (``--bbox_format abs_original``: pixels of
your image file, whatever the resize).  Without it, the text passes unchanged in both
directions (the family's own coordinates; ``qwenvl/data/render/grounding.py``).

Decoding is greedy and stops at ``<|im_end|>`` (looked up by name) or the model's
own end tokens.  On CUDA the model loads with ``dtype="auto"`` and
``device_map="auto"``; on CPU in float32.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


class CheckpointError(ValueError):
    """A ``--model`` / ``--base`` that cannot be loaded; the message says how to fix it."""


@dataclass
class Reply:
    """One generated answer: its text, its token ids (end token excluded) and why it stopped."""

    text: str
    token_ids: list[int]
    stopped_at_end: bool  # False when --max_new_tokens ran out first
    resized: list = field(default_factory=list)  # (width, height) of each image as the model saw it


def is_adapter_dir(path: str | Path) -> bool:
    """True for a LoRA checkpoint (an ``adapter_config.json`` written by peft)."""
    return (Path(path) / "adapter_config.json").is_file()


def _has_processor(path: Path) -> bool:
    return any((path / name).is_file() for name in PROCESSOR_FILES)


def _load_kwargs(device: str | None) -> dict:
    """How weights load: half precision and ``device_map="auto"`` on CUDA, float32 on CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return {"dtype": "auto", "device_map": "auto" if device == "cuda" else device}
    # CPU matmuls in bf16 are slow and lose precision; the tiny test models are float32 anyway.
    return {"dtype": torch.float32}


def load_checkpoint(model: str | Path, base: str | Path | None = None, device: str | None = None):
    """``(model, processor)`` of a full, merged or LoRA checkpoint, ready for ``generate``.

    A LoRA adapter is merged into its base after loading (``merge_and_unload``), so the
    result is the plain transformers model whatever the checkpoint kind.
    """
    from transformers import AutoProcessor

    from qwenvl.train.arguments import ConfigError
    from qwenvl.train.model import model_class_for, model_type_of, set_use_cache

    path = Path(model)
    if not path.is_dir():
        raise CheckpointError(f"--model {model}: no such directory")
    kwargs = _load_kwargs(device)
    if is_adapter_dir(path):
        from peft import PeftModel

        adapter_base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        base = str(base or adapter_base or "")
        if not base:
            raise CheckpointError(f"{path}/adapter_config.json names no base model; pass --base DIR")
        try:
            family = model_class_for(model_type_of(base))
        except ConfigError as err:
            raise CheckpointError(f"the base model of the adapter {path} does not load ({err}); pass --base DIR "
                                  "with the model the adapter was trained on") from None
        network = family.from_pretrained(base, **kwargs)
        network = PeftModel.from_pretrained(network, str(path)).merge_and_unload()
        processor_path = str(path) if _has_processor(path) else base
    elif (path / "config.json").is_file():
        if base is not None:
            print(f"note: --base {base} ignored: {path} is a full checkpoint", file=sys.stderr)
        try:
            family = model_class_for(model_type_of(str(path)))
        except ConfigError as err:
            raise CheckpointError(str(err)) from None
        network = family.from_pretrained(str(path), **kwargs)
        processor_path = str(path)
    else:
        raise CheckpointError(f"{path} has neither config.json (a model) nor adapter_config.json (a LoRA "
                              "adapter): pass a training output_dir or one of its checkpoint-N folders")
    network.eval()
    # Generation wants the KV cache that training switched off (saved configs have it back on,
    # but an adapter's base may not).
    set_use_cache(network, True)
    return network, AutoProcessor.from_pretrained(processor_path)


def end_token_ids(model, tokenizer) -> list[int]:
    """``<|im_end|>`` (by name) plus the model's own end tokens from its generation config."""
    ids = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is not None:
        ids += configured if isinstance(configured, (list, tuple)) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _to_device(inputs, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


@torch.no_grad()
def generate(model, processor, renderer, conversation, max_new_tokens: int = 128, thinking: str | None = None) -> Reply:
    """Greedy reply to ``conversation`` (which ends with a user turn), rendered by ``renderer``.

    ``thinking`` ("true"/"false") picks the Qwen3.5/3.6 generation prompt (opened think block,
    or the empty one); default: the renderer's ``--enable_thinking`` ("auto": the template's default).
    """
    from transformers import GenerationConfig

    inputs = renderer.encode(conversation, add_generation_prompt=True, thinking=thinking)
    prompt_len = inputs["input_ids"].shape[1]
    tokenizer = processor.tokenizer
    ends = end_token_ids(model, tokenizer)
    # A fresh greedy config: a checkpoint's sampling defaults (temperature, top_p) must not apply.
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=ends,
                              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0])
    out = model.generate(**_to_device(inputs, model.device), generation_config=config)
    new = out[0, prompt_len:].tolist()
    stop = next((i for i, t in enumerate(new) if t in ends), None)
    ids = new if stop is None else new[:stop]
    resized = []
    if inputs.get("image_grid_thw") is not None:
        patch = processor.image_processor.patch_size
        resized = [(int(w) * patch, int(h) * patch) for _, h, w in inputs["image_grid_thw"].tolist()]
    return Reply(text=tokenizer.decode(ids, skip_special_tokens=False), token_ids=ids, stopped_at_end=stop is not None,
                 resized=resized)


def image_sizes(conversation) -> list[tuple[int, int]]:
    """(width, height) of each image of ``conversation``, in order, as loaded for rendering."""
    from qwenvl.data.media.read import open_image
    from qwenvl.data.render.prompt import template_messages

    _, refs, _ = template_messages(conversation)
    return [open_image(ref, origin=conversation.origin).size for ref in refs]


def in_user_coordinates(text: str, renderer, conversation, reply: Reply, user_format: str | None) -> str:
    """``text`` (an answer in the family's coordinates) with its boxes/points in ``user_format``.

    The answer's boxes belong to the last image of ``conversation`` (the rule training uses
    for a reply that follows every image).  ``None`` or no image: ``text`` unchanged.
    """
    if user_format is None or not reply.resized:
        return text
    originals = image_sizes(conversation)
    return renderer.grounding.user_text(text, user_format, originals[-1], reply.resized[-1])


def written_by_training(path: str | Path) -> bool:
    """True for a ``train_qwen`` output folder or one of its ``checkpoint-N`` (``run_args.json`` beside it)."""
    path = Path(path)
    return (path / "run_args.json").is_file() or (path.parent / "run_args.json").is_file()


def chat_data_args(processor, video_from_processor: bool = True, **overrides):
    """The data settings a checkpoint was trained with, read back from its saved processor.

    Training writes ``--max_pixels``, ``--min_pixels`` and the ``--video_*`` flags into
    the processor it saves (``configure_processor``); reading them back makes inference
    resize images and sample video frames as training did.  Image bounds are always
    read (for a released checkpoint they are the model's own).  Video settings are read
    only with ``video_from_processor`` (a checkpoint written by training, see
    ``written_by_training``): a released Qwen3-VL processor's ``size`` bounds a whole
    video, not a frame, so there the ``--video_*`` defaults apply, as they would in a
    training run.  ``overrides`` (flags the user gave) win.
    """
    from qwenvl.data.arguments import DataArguments
    from qwenvl.data.render.processor_settings import whole_video_pixel_budget

    values = {}
    image_size = getattr(processor.image_processor, "size", None) or {}
    if image_size.get("shortest_edge") and image_size.get("longest_edge"):
        values.update(min_pixels=int(image_size["shortest_edge"]), max_pixels=int(image_size["longest_edge"]))
    video = getattr(processor, "video_processor", None)
    if video is not None and video_from_processor:
        for flag, attr, cast in (("video_fps", "fps", float), ("video_min_frames", "min_frames", int),
                                 ("video_max_frames", "max_frames", int)):
            if getattr(video, attr, None):
                values[flag] = cast(getattr(video, attr))
        size = getattr(video, "size", None) or {}
        if size.get("shortest_edge") and size.get("longest_edge"):
            low, high = int(size["shortest_edge"]), int(size["longest_edge"])
            if whole_video_pixel_budget(video):  # stored as frames x pixels: undo configure_processor
                low //= values.get("video_min_frames", 1)
                high //= values.get("video_max_frames", 1)
            values.update(video_min_pixels=low, video_max_pixels=high)
    given = {k: v for k, v in overrides.items() if v is not None}
    values.update(given)
    # One bound given below (above) the checkpoint's other bound: move that other bound along,
    # e.g. --max_pixels 12544 on a Qwen3-VL processor whose min_pixels is 65536.
    for low, high in (("min_pixels", "max_pixels"), ("video_min_pixels", "video_max_pixels")):
        if low in values and high in values and values[low] > values[high]:
            if high in given and low not in given:
                values[low] = values[high]
            elif low in given and high not in given:
                values[high] = values[low]
    return DataArguments(**values)


def make_renderer(model, processor, data_args, model_max_length: int | None = None):
    """The training renderer for ``model``'s family, with the processor set to ``data_args``."""
    from qwenvl.data.media.video import video_settings_from
    from qwenvl.data.render.processor_settings import configure_processor
    from qwenvl.data.render.sample import SampleRenderer

    configure_processor(processor, data_args)
    return SampleRenderer(processor, model.config, model_max_length, video_settings_from(data_args, processor),
                          thinking=getattr(data_args, "enable_thinking", "auto"))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint: full, merged, or a LoRA adapter folder")
    parser.add_argument("--base", default=None, help="base model of a LoRA adapter (default: from its config)")
    parser.add_argument("--image", nargs="+", default=[], help="image file(s), in order")
    parser.add_argument("--video", nargs="+", default=[], help="video file(s) (or folders of frames)")
    parser.add_argument("--prompt", required=True, help="the user's text; <image>/<video> tags place the media")
    parser.add_argument("--system", default=None, help="system prompt (default: the chat template's own)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--max_pixels", type=int, default=None, help="default: the checkpoint's saved setting")
    parser.add_argument("--min_pixels", type=int, default=None, help="default: the checkpoint's saved setting")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--bbox_format", default=None, choices=("abs_original", "abs_resized", "rel_1", "rel_1000"),
                        help="your coordinates: boxes in the prompt are converted to the model's, and answers back "
                             "(default: the model's own, unchanged)")
    parser.add_argument("--enable_thinking", choices=["auto", "true", "false"], default=None,
                        help="Qwen3.5/3.6: open a think block (true) or answer without thinking (false); default: "
                             "the chat template's default (Qwen3.5-4B+ and Qwen3.6 think, 0.8B/2B do not)")
    args = parser.parse_args(argv)

    from qwenvl.data.errors import DataError
    from qwenvl.data.render.prompt import user_conversation

    try:
        model, processor = load_checkpoint(args.model, args.base, args.device)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    data_args = chat_data_args(processor, written_by_training(args.model),
                               max_pixels=args.max_pixels, min_pixels=args.min_pixels,
                               enable_thinking=args.enable_thinking)
    renderer = make_renderer(model, processor, data_args)
    try:
        conversation = user_conversation(args.prompt, args.image, args.video, args.system)
        conversation.bbox_format = args.bbox_format
        reply = generate(model, processor, renderer, conversation, args.max_new_tokens)
        text = in_user_coordinates(reply.text, renderer, conversation, reply, args.bbox_format)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(text)
    return text


if __name__ == "__main__":
    main()
