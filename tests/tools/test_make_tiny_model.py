"""Tiny checkpoints load like the released ones: Auto classes, real token ids, real templates."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText

from qwenvl.tools.make_tiny_model import model_class
from tests.conftest import QWEN_VL_FAMILIES, load_processor

# The released Qwen2-VL / Qwen2.5-VL / Qwen3-VL tokenizers' ids (their tokenizer_config.json):
# the specification these checkpoints must match, so written out here on purpose.
RELEASED_IDS = {"<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                "<|image_pad|>": 151655, "<|video_pad|>": 151656}

# What the released chat templates render for one image question and its answer.
RENDERED = {
    "qwen2": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
              "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
              "<|im_start|>assistant\nred<|im_end|>\n"),
    "qwen3": ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
              "<|im_start|>assistant\nred<|im_end|>\n"),
}
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]


@pytest.mark.parametrize("model_type", QWEN_VL_FAMILIES)  # Qwen3.5: test_tiny_qwen3_5_loads_like_the_released_one
def test_tiny_checkpoint_loads_like_the_released_one(tiny_model_dir, model_type):
    path = tiny_model_dir(model_type)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "processor_config.json"):
        assert (path / name).is_file(), name
    processor = load_processor(path)
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == model_type
    assert type(AutoModelForImageTextToText.from_pretrained(path)) is model_class(model_type)
    model = model_class(model_type).from_pretrained(path)

    tokenizer = processor.tokenizer
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in RELEASED_IDS} == RELEASED_IDS
    assert config.text_config.vocab_size >= len(tokenizer)  # every id has an embedding row
    assert config.image_token_id == RELEASED_IDS["<|image_pad|>"]
    assert config.video_token_id == RELEASED_IDS["<|video_pad|>"]
    patch = 16 if model_type.startswith("qwen3") else 14
    assert config.vision_config.patch_size == processor.image_processor.patch_size == patch
    assert processor.image_processor.merge_size == 2 and processor.image_processor.temporal_patch_size == 2

    family = "qwen3" if model_type.startswith("qwen3") else "qwen2"
    assert processor.apply_chat_template(MESSAGES, tokenize=False) == RENDERED[family]
    video = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Moving?"}]}]
    assert "<|vision_start|><|video_pad|><|vision_end|>Moving?<|im_end|>\n<|im_start|>assistant\n" in \
        processor.apply_chat_template(video, tokenize=False, add_generation_prompt=True)

    inline = [{"role": m["role"], "content": [dict(p, image=Image.new("RGB", (56, 56), (200, 0, 0)))
                                              if p["type"] == "image" else p for p in m["content"]]}
              for m in MESSAGES]
    batch = processor.apply_chat_template(inline, tokenize=True, return_dict=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("model.visual") for n in grads) and any("language_model" in n for n in grads)


def test_qwen2_families_do_not_know_qwen3_only_tokens(tiny_model_dir):
    """Qwen2.5-VL's release stops its added tokens at <|file_sep|>; <think> is ordinary text there."""
    q25 = load_processor(tiny_model_dir("qwen2_5_vl")).tokenizer
    q3 = load_processor(tiny_model_dir("qwen3_vl")).tokenizer
    assert len(q3("<think>", add_special_tokens=False)["input_ids"]) == 1
    assert len(q25("<think>", add_special_tokens=False)["input_ids"]) > 1
    saved = json.loads((tiny_model_dir("qwen2_5_vl") / "tokenizer_config.json").read_text())
    assert "<|im_end|>" == saved["eos_token"]


# ----------------------------------------------------------------------------- Qwen3.5 / Qwen3.6

# What the released Qwen3.5 / Qwen3.6 chat templates render (rendered with the released
# template texts, as TRL vendors them in trl/chat_templates/qwen3_5_think.jinja,
# qwen3_5_nothink.jinja and qwen3_6.jinja): the specification the tiny models' templates meet.
Q35_ANSWERED = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
                "<|im_start|>assistant\n<think>\n\n</think>\n\nred<|im_end|>\n")
Q35_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n<|im_start|>assistant\n"
Q35_TWO_TURNS = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "A", "reasoning_content": "r1"},
                 {"role": "user", "content": "b"}, {"role": "assistant", "content": "<think>r2</think>B"}]
Q35_TWO_DROPPED = ("<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nb<|im_end|>\n"
                   "<|im_start|>assistant\n<think>\nr2\n</think>\n\nB<|im_end|>\n")
Q35_TWO_KEPT = ("<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n<think>\nr1\n</think>\n\nA<|im_end|>\n"
                "<|im_start|>user\nb<|im_end|>\n<|im_start|>assistant\n<think>\nr2\n</think>\n\nB<|im_end|>\n")
Q35_RELEASES = {  # template -> (default generation prompt suffix, rendering of Q35_TWO_TURNS with preserve_thinking)
    "qwen3_5_think": ("<think>\n", Q35_TWO_DROPPED),
    "qwen3_5_nothink": ("<think>\n\n</think>\n\n", Q35_TWO_DROPPED),
    "qwen3_6": ("<think>\n", Q35_TWO_KEPT),
}


@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen3_5_moe"])
def test_tiny_qwen3_5_loads_like_the_released_one(tiny_model_dir, model_type):
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5Config

    path = tiny_model_dir(model_type)
    processor = load_processor(path)
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == model_type
    assert type(AutoModelForImageTextToText.from_pretrained(path)) is model_class(model_type)
    assert type(processor).__name__ == "Qwen3VLProcessor"
    assert type(processor.video_processor).__name__ == "Qwen3VLVideoProcessor"
    tokenizer = processor.tokenizer
    released = Qwen3_5Config()  # transformers' defaults are the released ids and vocabulary
    assert config.text_config.vocab_size == released.text_config.vocab_size == 248320
    for name, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        assert getattr(config, name) == getattr(released, name) == tokenizer.convert_tokens_to_ids(token)
    assert (config.image_token_id, config.video_token_id) == (248056, 248057)
    # Three Gated DeltaNet layers, then one gated full-attention layer; no DeepStack.
    assert config.text_config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert not hasattr(config.vision_config, "deepstack_visual_indexes")
    assert config.vision_config.patch_size == processor.image_processor.patch_size == 16
    assert list(processor.image_processor.image_mean) == list(processor.image_processor.image_std) == [0.5] * 3
    if model_type == "qwen3_5_moe":
        assert config.text_config.num_experts > config.text_config.num_experts_per_tok > 1

    assert processor.apply_chat_template(MESSAGES, tokenize=False) == Q35_ANSWERED
    inline = [{"role": m["role"], "content": [dict(p, image=Image.new("RGB", (64, 64), (200, 0, 0)))
                                              if p["type"] == "image" else p for p in m["content"]]}
              for m in MESSAGES]
    batch = processor.apply_chat_template(inline, tokenize=True, return_dict=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    model = model_class(model_type).from_pretrained(path)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("model.visual") for n in grads) and any("linear_attn" in n for n in grads)


@pytest.mark.parametrize("template", sorted(Q35_RELEASES))
def test_qwen3_5_templates_render_what_the_releases_render(tiny_model_dir, template):
    processor = load_processor(tiny_model_dir("qwen3_5", template))
    default_prompt, preserved = Q35_RELEASES[template]
    render = processor.apply_chat_template
    assert render(MESSAGES, tokenize=False) == Q35_ANSWERED
    assert render(MESSAGES[:1], tokenize=False, add_generation_prompt=True) == Q35_PROMPT + default_prompt
    assert render(MESSAGES[:1], tokenize=False, add_generation_prompt=True, enable_thinking=True) == \
        Q35_PROMPT + "<think>\n"
    assert render(MESSAGES[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False) == \
        Q35_PROMPT + "<think>\n\n</think>\n\n"
    assert render(Q35_TWO_TURNS, tokenize=False) == Q35_TWO_DROPPED
    assert render(Q35_TWO_TURNS, tokenize=False, preserve_thinking=True) == preserved
    # Text is trimmed; a system prompt is written as given, none by default.
    trimmed = [{"role": "system", "content": " Be brief.\n"}, {"role": "user", "content": "\n hi \n"},
               {"role": "assistant", "content": "\nhello "}]
    assert render(trimmed, tokenize=False) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                                               "<|im_start|>assistant\n<think>\n\n</think>\n\nhello<|im_end|>\n")


def test_make_tiny_model_template_option_is_for_qwen3_5_only(tmp_path):
    from qwenvl.tools.make_tiny_model import make_tiny_model

    with pytest.raises(SystemExit, match="one template"):
        make_tiny_model("qwen2_5_vl", tmp_path / "x", template="qwen3_6")
    with pytest.raises(SystemExit, match="--template must be one of"):
        make_tiny_model("qwen3_5", tmp_path / "y", template="qwen3_7")


# Tools and a video, for the training renderer against each release's template (the processor's own rendering).
Q35_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                    "units": {"type": "array", "items": {"type": "string"}}},
                   "required": ["city"]}}}]
# Arguments of every JSON type: the releases write non-string values differently (3.6: JSON; 3.5: JSON for
# objects and arrays only).
Q35_ARGS = {"city": "Paris", "days": 3, "ratio": 0.5, "metric": True, "region": None, "units": ["C", "F"],
            "extra": {"hourly": False}}


def _q35_tool_messages() -> list[dict]:
    def text(t):
        return [{"type": "text", "text": t}]
    return [{"role": "system", "content": text("You help with the weather.")},
            {"role": "user", "content": text("Weather in Paris and Rome?")},
            {"role": "assistant", "content": text("Checking."), "reasoning_content": "I need the tool twice.",
             "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": Q35_ARGS}},
                            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
            {"role": "tool", "content": text('{"temperature": 21}')},
            {"role": "tool", "content": text('{"temperature": 25}')},
            {"role": "assistant", "content": text("21 and 25 degrees."), "reasoning_content": "Both came back."}]


@pytest.mark.parametrize("template", sorted(Q35_RELEASES))
def test_qwen3_5_training_render_with_tools_is_the_release_template(tiny_model_dir, template):
    """Tool definitions, reasoning with two calls, two tool responses and a final answer: the training sample
    is token for token what the release's template renders through the processor (tools=)."""
    from qwenvl.data.catalog.formats import Conversation
    from qwenvl.data.render.sample import IGNORE_INDEX, SampleRenderer

    path = tiny_model_dir("qwen3_5", template)
    processor, config = load_processor(path), AutoConfig.from_pretrained(path)
    sample = SampleRenderer(processor, config).render(
        Conversation(messages=_q35_tool_messages(), origin="tools", tools=Q35_TOOLS))
    assert "pack" not in sample  # the reasoning turns follow the last user query: one sample
    expected_text = processor.apply_chat_template(_q35_tool_messages(), tools=Q35_TOOLS, tokenize=False)
    expected = processor.apply_chat_template(_q35_tool_messages(), tools=Q35_TOOLS, tokenize=True, return_dict=True,
                                             return_tensors="pt")
    assert processor.tokenizer.decode(sample["input_ids"]) == expected_text
    assert torch.equal(sample["input_ids"], expected["input_ids"][0])
    assert expected_text.count("<tool_call>\n<function=get_weather>") == 2 and expected_text.count("<tool_response>") == 2
    assert expected_text.count("<think>") == 2  # both turns after the query keep their reasoning
    trained = processor.tokenizer.decode(sample["labels"][sample["labels"] != IGNORE_INDEX])
    assert trained.count("<tool_call>") == 2 and "temperature" not in trained and "Both came back." in trained


@pytest.mark.parametrize("template", sorted(Q35_RELEASES))
def test_qwen3_5_training_render_with_a_video_is_the_release_template(tiny_model_dir, template):
    """An image, a video and a reasoned answer: the training sample is the release's template rendered and
    expanded by the processor on the same frames (the 3.5 video processor's per-frame timestamps)."""
    from pathlib import Path

    from qwenvl.data.catalog.formats import Conversation
    from qwenvl.data.media.video import VideoSettings, load_video, processor_video_inputs, processor_videos_kwargs
    from qwenvl.data.render.sample import SampleRenderer

    video = str(Path(__file__).resolve().parents[2] / "demo_data" / "videos" / "0000.mp4")
    path = tiny_model_dir("qwen3_5", template)
    processor, config = load_processor(path), AutoConfig.from_pretrained(path)
    processor.image_processor.size = {"shortest_edge": 32 * 32, "longest_edge": 64 * 64}
    settings = VideoSettings.for_processor(processor, fps=4.0, min_frames=4, max_frames=8, min_pixels=28 * 28,
                                           max_pixels=56 * 56)
    image = Image.new("RGB", (64, 48), (200, 0, 0))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "video", "video": video},
                                             {"type": "text", "text": "Where does the square go?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "right"}],
                 "reasoning_content": "It moves to the right."}]
    sample = SampleRenderer(processor, config, video_settings=settings).render(
        Conversation(messages=messages, origin="video"))

    template_messages = [{"role": m["role"], "content": [{"type": p["type"], **({"text": p["text"]} if "text" in p
                                                                                else {})} for p in m["content"]],
                          **({"reasoning_content": m["reasoning_content"]} if "reasoning_content" in m else {})}
                         for m in messages]
    text = processor.apply_chat_template(template_messages, tokenize=False)
    assert "<|vision_start|><|video_pad|><|vision_end|>Where does the square go?" in text
    assert text.endswith("<think>\nIt moves to the right.\n</think>\n\nright<|im_end|>\n")
    frames, meta = processor_video_inputs(load_video(video, settings))
    expected = processor(text=[text], images=[image], videos=[frames], return_tensors="pt",
                         videos_kwargs=processor_videos_kwargs([meta]))
    assert torch.equal(sample["input_ids"], expected["input_ids"][0])
    assert torch.equal(sample["video_grid_thw"], expected["video_grid_thw"])
    assert torch.equal(sample["image_grid_thw"], expected["image_grid_thw"])
    assert "seconds>" in processor.tokenizer.decode(sample["input_ids"])  # the per-frame timestamps
