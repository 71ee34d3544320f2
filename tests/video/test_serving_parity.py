"""Video time as the serving stack computes it: our samples against qwen-vl-utils' ``fetch_video``.

A fine-tuned model is served through qwen-vl-utils + transformers (or vLLM, which
uses the same numbers).  For the same file and the same sampling flags
(``--video_fps 2 --video_min_frames 4``), the rendered training sample must carry what
serving gives the model: the same frames, Qwen2.5-VL's ``second_per_grid_ts``, Qwen3-VL's
``<t seconds>`` labels, and so the same input ids and mRoPE positions.  The clips are
the issue's: 3 s at 60 fps (6 frames sampled) and 1 s at 24 fps (4 frames), where the
old one-over-spacing rate was 19% and 28% off.
"""
from __future__ import annotations

import re

import pytest
import torch

from qwenvl.data.catalog.formats import Conversation
from qwenvl.data.media.video import VideoSettings, load_video
from qwenvl.data.render.sample import SampleRenderer
from tests.conftest import load_processor

vision_process = pytest.importorskip("qwen_vl_utils.vision_process")

CLIPS = ["3s_60fps", "1s_24fps", "10s_25fps"]
PIXELS = 4 * 28 * 28  # 2x2 merged patches per frame for the 14-px families: tiny tensors
SERVED_SECOND_PER_GRID = {"3s_60fps": 1.0, "1s_24fps": 0.5, "10s_25fps": 1.0}  # 2 / (n / total * fps)


def _served(path, patch: int) -> tuple[torch.Tensor, dict, float]:
    factor = patch * 2
    element = {"type": "video", "video": str(path), "fps": 2.0, "min_frames": 4,
               "min_pixels": 4 * factor * factor, "max_pixels": 4 * factor * factor}
    (video, metadata), sample_fps = vision_process.fetch_video(
        element, image_patch_size=patch, return_video_sample_fps=True, return_video_metadata=True)
    return video, metadata, sample_fps


def _settings(processor) -> VideoSettings:
    factor = VideoSettings.for_processor(processor).factor
    return VideoSettings.for_processor(processor, fps=2.0, min_frames=4, min_pixels=4 * factor ** 2,
                                       max_pixels=4 * factor ** 2)


@pytest.fixture(scope="module")
def family(request, tiny_model_dir):
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = tiny_model_dir(request.param)
    return load_processor(path), AutoConfig.from_pretrained(path), \
        AutoModelForImageTextToText.from_pretrained(path)


def _conversation(path) -> Conversation:
    return Conversation(messages=[
        {"role": "user", "content": [{"type": "video", "video": str(path)},
                                     {"type": "text", "text": "What happens?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "it fades"}]}], origin="test")


def _template_messages(conversation: Conversation) -> list[dict]:
    return [{"role": m["role"], "content": [{"type": p["type"], **({"text": p["text"]} if "text" in p else {})}
                                            for p in m["content"]]} for m in conversation.messages]


@pytest.mark.parametrize("name", CLIPS)
def test_frames_and_rate_equal_fetch_video(processors, video_dir, name):
    processor = processors["qwen2_5_vl"]
    video, metadata, sample_fps = _served(video_dir / f"{name}.mp4", 14)
    clip = load_video(video_dir / f"{name}.mp4", _settings(processor))
    assert clip.frame_indices == list(metadata["frames_indices"])
    assert clip.total_frames == metadata["total_num_frames"]
    assert clip.sampled_fps == pytest.approx(sample_fps, rel=1e-9)
    assert clip.second_per_grid_t(2) == pytest.approx(SERVED_SECOND_PER_GRID[name])
    assert tuple(clip.frames.shape) == tuple(video.shape)


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)
@pytest.mark.parametrize("name", CLIPS)
def test_qwen2_5_vl_sample_equals_the_served_inputs(family, video_dir, name):
    """Ids, second_per_grid_ts and mRoPE positions of our sample equal those of the
    qwen-vl-utils recipe (``return_video_metadata=True``, the metadata handed to the processor).

    qwen-vl-utils' older Qwen2.5-VL recipe passes ``fps=[sample_fps]`` instead; transformers 5
    reads ``fps`` only as a rate to sample at, so with ``do_sample_frames=False`` and no
    metadata it falls back to 24 fps (second_per_grid_ts 2/24).  The metadata path gives
    ``temporal_patch_size / sample_fps``, the number ``fetch_video`` returns, as intended.
    """
    processor, config, model = family
    path = video_dir / f"{name}.mp4"
    conversation = _conversation(path)
    sample = SampleRenderer(processor, config, video_settings=_settings(processor)).render(conversation)

    video, metadata, sample_fps = _served(path, 14)
    text = processor.apply_chat_template(_template_messages(conversation), tokenize=False)
    served = processor(text=[text], videos=[video], video_metadata=[metadata], do_sample_frames=False,
                       do_resize=False, return_tensors="pt")
    assert served["second_per_grid_ts"].tolist() == pytest.approx([2 / sample_fps])
    assert served["second_per_grid_ts"].tolist() == pytest.approx([SERVED_SECOND_PER_GRID[name]])
    assert sample["second_per_grid_ts"].tolist() == pytest.approx(served["second_per_grid_ts"].tolist())
    assert torch.equal(sample["input_ids"], served["input_ids"][0])
    assert torch.equal(sample["video_grid_thw"], served["video_grid_thw"])
    positions, _ = model.model.get_rope_index(
        served["input_ids"], mm_token_type_ids=served["mm_token_type_ids"], video_grid_thw=served["video_grid_thw"],
        second_per_grid_ts=torch.as_tensor(served["second_per_grid_ts"]))
    assert torch.equal(sample["position_ids"], positions[:, 0])


@pytest.mark.parametrize("family", ["qwen3_vl"], indirect=True)
@pytest.mark.parametrize("name", CLIPS)
def test_qwen3_vl_sample_equals_the_served_inputs(family, video_dir, name):
    """Ids (with the ``<t seconds>`` labels) and positions equal those of the qwen-vl-utils
    Qwen3-VL recipe (``return_video_metadata=True``, metadata passed to the processor)."""
    processor, config, model = family
    path = video_dir / f"{name}.mp4"
    conversation = _conversation(path)
    clip = load_video(path, _settings(processor))
    sample = SampleRenderer(processor, config, video_settings=_settings(processor)).render(conversation)

    video, metadata, _ = _served(path, 16)
    text = processor.apply_chat_template(_template_messages(conversation), tokenize=False)
    served = processor(text=[text], videos=[video], video_metadata=[metadata], do_sample_frames=False,
                       do_resize=False, return_tensors="pt")
    shown = re.findall(r"<(\d+\.\d) seconds>", processor.tokenizer.decode(served["input_ids"][0]))
    assert shown == [f"{t:.1f}" for t in clip.grid_timestamps()]
    assert torch.equal(sample["input_ids"], served["input_ids"][0])
    assert torch.equal(sample["video_grid_thw"], served["video_grid_thw"])
    positions, _ = model.model.get_rope_index(
        served["input_ids"], mm_token_type_ids=served["mm_token_type_ids"], video_grid_thw=served["video_grid_thw"])
    assert torch.equal(sample["position_ids"], positions[:, 0])
