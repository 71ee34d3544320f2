"""The renderer against the families' own processors and get_rope_index."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText

from qwenvl.data.catalog.formats import Conversation
from qwenvl.data.render.fit import SampleTooLong
from qwenvl.data.render.sample import IGNORE_INDEX, SampleRenderer
from tests.conftest import FAMILIES, load_processor


def _image(w, h, colour):
    return Image.new("RGB", (w, h), colour)


def _conversation(kind: str) -> Conversation:
    red, blue = _image(84, 56, (220, 20, 20)), _image(56, 112, (20, 20, 220))
    if kind == "image":
        messages = [
            {"role": "user", "content": [{"type": "image", "image": red}, {"type": "text", "text": "\nWhat colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        ]
    elif kind == "multi_image":
        messages = [
            {"role": "system", "content": [{"type": "text", "text": "You compare pictures."}]},
            {"role": "user", "content": [{"type": "image", "image": red}, {"type": "text", "text": " and "},
                                         {"type": "image", "image": blue}, {"type": "text", "text": " differ?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
            {"role": "user", "content": [{"type": "text", "text": "Which is taller?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "the second"}]},
        ]
    else:
        messages = [
            {"role": "user", "content": [{"type": "text", "text": "What is 2 + 3?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "5"}]},
        ]
    return Conversation(messages=messages, origin=f"test {kind}")


def _inline(conversation: Conversation) -> list[dict]:
    """The same conversation in the processor's inline-media form, for apply_chat_template."""
    return [{"role": m["role"], "content": [dict(p) for p in m["content"]]} for m in conversation.messages]


@pytest.fixture(scope="module")
def family(request, tiny_model_dir):
    path = tiny_model_dir(request.param)
    processor = load_processor(path)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    return processor, config, model


@pytest.mark.parametrize("family", FAMILIES, indirect=True)
@pytest.mark.parametrize("kind", ["image", "multi_image", "text"])
def test_ids_labels_positions_match_the_family(family, kind):
    processor, config, model = family
    conversation = _conversation(kind)
    sample = SampleRenderer(processor, config).render(conversation)

    expected = processor.apply_chat_template(_inline(conversation), tokenize=True, return_dict=True,
                                             return_tensors="pt")
    assert torch.equal(sample["input_ids"], expected["input_ids"][0])
    if "image_grid_thw" in expected:
        assert torch.equal(sample["image_grid_thw"], expected["image_grid_thw"])
        assert torch.equal(sample["pixel_values"], expected["pixel_values"])
    else:
        assert "pixel_values" not in sample

    # Positions: the full model's own get_rope_index on the same inputs.
    reference, _ = model.model.get_rope_index(
        expected["input_ids"], mm_token_type_ids=expected["mm_token_type_ids"],
        image_grid_thw=expected.get("image_grid_thw"))
    assert torch.equal(sample["position_ids"], reference[:, 0])

    # Labels: exactly the assistant replies, each with its closing <|im_end|>.
    tokenizer = processor.tokenizer
    trained = sample["labels"] != IGNORE_INDEX
    assert torch.equal(sample["labels"][trained], sample["input_ids"][trained])
    replies = [m["content"][0]["text"] for m in conversation.messages if m["role"] == "assistant"]
    assert tokenizer.decode(sample["labels"][trained]) == "".join(r + "<|im_end|>" for r in replies)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert int((sample["labels"] == im_end).sum()) == len(replies)
    for name in ("<|image_pad|>", "<|video_pad|>", "<|im_start|>", "<|vision_start|>"):
        assert not bool((sample["labels"] == tokenizer.convert_tokens_to_ids(name)).any())


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)
def test_too_long_samples_shrink_images_and_never_cut_them(family):
    processor, config, _ = family
    big = Conversation(messages=[
        {"role": "user", "content": [{"type": "image", "image": _image(448, 448, (0, 200, 0))},
                                     {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "green"}]}], origin="test big")
    full = SampleRenderer(processor, config).render(big)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    full_visual = int((full["input_ids"] == image_pad).sum())
    limit = full["input_ids"].shape[0] - full_visual // 2
    shrunk = SampleRenderer(processor, config, model_max_length=limit).render(big)
    assert shrunk["input_ids"].shape[0] <= limit
    visual = int((shrunk["input_ids"] == image_pad).sum())
    assert 0 < visual < full_visual
    merge = processor.image_processor.merge_size
    assert visual == int(shrunk["image_grid_thw"].prod()) // merge ** 2  # tokens match the features
    assert shrunk["pixel_values"].shape[0] == int(shrunk["image_grid_thw"].prod())


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)
def test_text_longer_than_the_limit_is_refused_with_its_origin(family):
    processor, config, _ = family
    with pytest.raises(SampleTooLong, match="test text"):
        SampleRenderer(processor, config, model_max_length=8).render(_conversation("text"))


REPO_VIDEO = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "demo_data" / "videos" / "0000.mp4")


@pytest.mark.parametrize("family", FAMILIES, indirect=True)
def test_video_and_image_sample_matches_processor_and_rope(family):
    """An image+video sample keeps both; ids equal the processor's on the same frames and
    positions equal the full model's get_rope_index (with Qwen2.5-VL's second_per_grid_ts)."""
    from qwenvl.data.media.video import VideoSettings, load_video, processor_video_inputs, processor_videos_kwargs

    processor, config, model = family
    settings = VideoSettings.for_processor(processor, fps=4.0, min_frames=4, max_frames=8,
                                           min_pixels=28 * 28, max_pixels=56 * 56)
    image = _image(84, 56, (220, 20, 20))
    conversation = Conversation(messages=[
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "video", "video": REPO_VIDEO},
                                     {"type": "text", "text": "Where does it go?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "right"}]}], origin="test video")
    sample = SampleRenderer(processor, config, video_settings=settings).render(conversation)

    clip = load_video(REPO_VIDEO, settings)
    frames, meta = processor_video_inputs(clip)
    template = [{"role": m["role"], "content": [{"type": p["type"], **({"text": p["text"]} if "text" in p else {})}
                                                for p in m["content"]]} for m in conversation.messages]
    text = processor.apply_chat_template(template, tokenize=False)
    expected = processor(text=[text], images=[image], videos=[frames], return_tensors="pt",
                         videos_kwargs=processor_videos_kwargs([meta]))
    assert torch.equal(sample["input_ids"], expected["input_ids"][0])
    assert torch.equal(sample["video_grid_thw"], expected["video_grid_thw"])
    assert "image_grid_thw" in sample and "pixel_values" in sample and "pixel_values_videos" in sample
    assert int(sample["video_grid_thw"][0, 0]) * processor.video_processor.temporal_patch_size == len(clip.frame_indices)
    kwargs = {}
    if "second_per_grid_ts" in expected:
        kwargs["second_per_grid_ts"] = torch.as_tensor(expected["second_per_grid_ts"])
        # Timing from the frames actually sampled, not the configured fps.
        assert sample["second_per_grid_ts"].tolist() == pytest.approx([2 / clip.sampled_fps])
    reference, _ = model.model.get_rope_index(
        expected["input_ids"], mm_token_type_ids=expected["mm_token_type_ids"],
        image_grid_thw=expected["image_grid_thw"], video_grid_thw=expected["video_grid_thw"], **kwargs)
    assert torch.equal(sample["position_ids"], reference[:, 0])
    loss = model(**{k: v[None] if k in ("input_ids", "labels") else v for k, v in sample.items()
                    if k != "position_ids"}, position_ids=sample["position_ids"][:, None]).loss
    assert torch.isfinite(loss)
