"""Clips through the real Qwen2-VL, Qwen2.5-VL and Qwen3-VL processors: grids and timing."""
from __future__ import annotations

import re

import pytest
import torch

from qwenvl.data.media.video import (
                                     VideoSettings, load_video, processor_video_inputs, processor_videos_kwargs,
                                     )

VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
NAMES = ["10s_25fps", "3s_60fps", "1s_24fps"]


def _settings(processor, backend="auto"):
    # Two by two merged patches a frame: real processors, tiny tensors.
    factor = VideoSettings.for_processor(processor).factor
    return VideoSettings.for_processor(processor, backend=backend, min_pixels=4 * factor ** 2,
                                       max_pixels=4 * factor ** 2)


def _run(processor, clip, text=VIDEO, **kwargs):
    video, metadata = processor_video_inputs(clip)
    return processor(text=[text], videos=[video], videos_kwargs=processor_videos_kwargs([metadata]),
                     return_tensors="pt", **kwargs)


def _expected_grid(clip, patch):
    t, _, h, w = clip.frames.shape
    return [t // 2, h // patch, w // patch]


@pytest.mark.parametrize("name", NAMES)
def test_qwen2_5_vl_second_per_grid_ts_is_the_serving_rate(processors, video_dir, backend, name):
    processor = processors["qwen2_5_vl"]
    clip = load_video(video_dir / f"{name}.mp4", _settings(processor, backend))
    out = _run(processor, clip)
    assert out["video_grid_thw"].tolist() == [_expected_grid(clip, 14)]
    assert out["second_per_grid_ts"].tolist() == pytest.approx([2 / clip.sampled_fps])
    # temporal_patch_size over (frames sampled / frames in the file * file rate), as served.
    rate = len(clip.frame_indices) / clip.total_frames * clip.source_fps
    assert out["second_per_grid_ts"].item() == pytest.approx(2 / rate, rel=1e-6)
    tokens = int((out["input_ids"] == processor.video_token_id).sum())
    assert tokens == out["video_grid_thw"].prod().item() // 4


@pytest.mark.parametrize("name", NAMES)
def test_qwen3_vl_timestamps_are_the_times_of_the_frames(processors, video_dir, backend, name):
    processor = processors["qwen3_vl"]
    clip = load_video(video_dir / f"{name}.mp4", _settings(processor, backend))
    out = _run(processor, clip)
    assert out["video_grid_thw"].tolist() == [_expected_grid(clip, 16)]
    text = processor.tokenizer.decode(out["input_ids"][0])
    printed = re.findall(r"<(\d+\.\d) seconds>", text)
    assert len(printed) == len(clip.frames) // 2
    # Qwen3-VL prints the mean time (index / fps) of each temporal pair, to one decimal; on these
    # constant-rate files that is also the mean of the decoded presentation times.
    real = [(clip.timestamps[i] + clip.timestamps[i + 1]) / 2 for i in range(0, len(clip.timestamps), 2)]
    assert printed == [f"{t:.1f}" for t in clip.grid_timestamps()]
    assert [float(p) for p in printed] == pytest.approx(real, abs=0.05 + 1e-9)


def test_qwen2_vl_gets_grids_and_no_timing(processors, video_dir):
    processor = processors["qwen2_vl"]
    clip = load_video(video_dir / "3s_60fps.mp4", _settings(processor))
    out = _run(processor, clip)
    assert out["video_grid_thw"].tolist() == [_expected_grid(clip, 14)]
    assert "second_per_grid_ts" not in out
    assert out["pixel_values_videos"].shape == (out["video_grid_thw"].prod().item(), 3 * 2 * 14 * 14)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_images_in_the_same_call_are_still_resized(processors, video_dir, family):
    # The video options go in videos_kwargs: a flat do_resize=False would reach the image
    # processor too and leave a 64x48 image unpatchifiable.
    processor = processors[family]
    clip = load_video(video_dir / "1s_24fps.mp4", _settings(processor))
    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)
    out = _run(processor, clip, text=IMAGE + VIDEO, images=[image])
    patch = processor.image_processor.patch_size
    grid = out["image_grid_thw"][0].tolist()
    assert grid[0] == 1 and grid[1] % 2 == 0 and grid[2] % 2 == 0 and grid[1] * grid[2] >= 4
    assert out["video_grid_thw"].tolist() == [_expected_grid(clip, patch)]


def test_two_videos_keep_their_own_timing(processors, video_dir):
    processor = processors["qwen2_5_vl"]
    settings = _settings(processor)
    clips = [load_video(video_dir / f"{n}.mp4", settings) for n in ("10s_25fps", "1s_24fps")]
    videos, metadata = zip(*(processor_video_inputs(c) for c in clips))
    out = processor(text=[VIDEO + VIDEO], videos=list(videos), videos_kwargs=processor_videos_kwargs(metadata),
                    return_tensors="pt")
    assert out["second_per_grid_ts"].tolist() == pytest.approx([2 / c.sampled_fps for c in clips])


def test_frame_list_timing_reaches_qwen3_vl(processors, tmp_path, frames_writer):
    processor = processors["qwen3_vl"]
    paths = frames_writer(tmp_path / "frames", 8)
    clip = load_video(paths, _settings(processor))
    out = _run(processor, clip)
    text = processor.tokenizer.decode(out["input_ids"][0])
    assert re.findall(r"<(\d+\.\d) seconds>", text) == ["0.2", "1.2", "2.2", "3.2"]  # pairs at 2 fps
