"""Frame counts, indices, sampled rate and frame sizes: pure functions, no decoding."""
from __future__ import annotations

import math

import pytest

from qwenvl.data.media.video import (
                                     VideoSettings, frame_count, frame_size, sample_frame_indices, serving_fps,
                                     )


def test_counts_follow_duration_times_fps():
    s = VideoSettings()
    assert frame_count(250, 25.0, s) == 20  # 10 s at 2 fps
    assert frame_count(180, 60.0, s) == 6  # 3 s at 2 fps
    assert frame_count(24, 24.0, s) == 4  # 1 s -> 2, raised to min_frames


def test_counts_clamp_and_round_to_temporal_patch():
    assert frame_count(250, 25.0, VideoSettings(max_frames=9)) == 8  # max rounded down to even
    assert frame_count(250, 25.0, VideoSettings(min_frames=31, max_frames=40)) == 32  # min rounded up
    assert frame_count(250, 25.0, VideoSettings(fps=1.3)) == 12  # 13 -> even
    assert frame_count(5, 25.0, VideoSettings(min_frames=8)) == 4  # capped by the file, then even
    assert frame_count(250, 25.0, VideoSettings(temporal_patch_size=4, fps=1.5)) == 12


def test_file_shorter_than_one_temporal_patch_repeats_its_frame():
    assert sample_frame_indices(1, 25.0, VideoSettings()) == [0, 0]


@pytest.mark.parametrize("total,fps", [(250, 25.0), (180, 60.0), (24, 24.0), (7, 30.0), (3001, 29.97), (90000, 30.0)])
@pytest.mark.parametrize("settings", [VideoSettings(), VideoSettings(fps=0.5, min_frames=3, max_frames=17),
                                      VideoSettings(fps=4.0, max_frames=64)])
def test_counts_match_qwen_vl_utils(total, fps, settings):
    vision_process = pytest.importorskip("qwen_vl_utils.vision_process")
    official = vision_process.smart_nframes(
        {"fps": settings.fps, "min_frames": settings.min_frames, "max_frames": settings.max_frames},
        total_frames=total, video_fps=fps)
    assert frame_count(total, fps, settings) == official


def test_indices_are_evenly_spaced_first_to_last_and_deterministic():
    indices = sample_frame_indices(250, 25.0, VideoSettings())
    assert indices[0] == 0 and indices[-1] == 249 and len(indices) == 20
    assert indices == sample_frame_indices(250, 25.0, VideoSettings())
    # Each index is the nearest frame to an exactly even grid.
    for i, index in enumerate(indices):
        assert abs(index - i * 249 / 19) <= 0.5
    assert sample_frame_indices(24, 24.0, VideoSettings()) == [0, 8, 15, 23]


def test_serving_fps_is_frames_sampled_over_frames_in_the_file():
    # Frames sampled per frame of the source, times its rate: what serving computes,
    # not one over the sampled frames' spacing (24 * 3 / 23 = 3.13 for these four).
    assert serving_fps(4, 24, 24.0) == pytest.approx(4.0)
    assert serving_fps(6, 180, 60.0) == pytest.approx(2.0)
    assert serving_fps(2, 1, 25.0) == pytest.approx(50.0)  # a repeated single frame, as transformers counts it


@pytest.mark.parametrize("total,fps", [(24, 24.0), (180, 60.0), (250, 25.0), (31, 29.97)])
def test_serving_fps_is_what_transformers_video_metadata_says(total, fps):
    from transformers.video_utils import VideoMetadata

    indices = sample_frame_indices(total, fps, VideoSettings())
    meta = VideoMetadata(total_num_frames=total, fps=fps, frames_indices=indices)
    assert serving_fps(len(indices), total, fps) == pytest.approx(meta.sampled_fps, rel=1e-12)


@pytest.mark.parametrize("height,width", [(48, 64), (360, 640), (1080, 1920), (2160, 3840), (100, 7000), (30, 30)])
@pytest.mark.parametrize("patch", [14, 16])
def test_frame_size_matches_qwen_vl_utils(height, width, patch):
    vision_process = pytest.importorskip("qwen_vl_utils.vision_process")
    s = VideoSettings(patch_size=patch)
    h, w = frame_size(height, width, 8, s)
    assert (h, w) == vision_process.smart_resize(height, width, factor=2 * patch, min_pixels=s.frame_min_pixels,
                                                 max_pixels=s.frame_max_pixels)
    assert h % (2 * patch) == 0 and w % (2 * patch) == 0
    assert s.frame_min_pixels <= h * w <= s.frame_max_pixels


def test_total_pixel_budget_is_shared_between_frames():
    s = VideoSettings(total_pixels=64 * 28 * 28 * 10, max_pixels=10**9, min_pixels=4 * 28 * 28)
    h, w = frame_size(1080, 1920, 20, s)
    # Budget counts one frame per temporal patch: 20 frames share it as 10 patches.
    assert h * w <= 64 * 28 * 28
    assert h * w > 0.5 * 64 * 28 * 28
    # However many frames, the per-frame cap never drops below 1.05 x min_pixels.
    floor = VideoSettings(max_pixels=int(4 * 28 * 28 * 1.05), min_pixels=4 * 28 * 28)
    assert frame_size(1080, 1920, 100_000, s) == frame_size(1080, 1920, 1, floor) == (28, 56)


def test_extreme_aspect_ratio_is_refused():
    with pytest.raises(ValueError, match="200"):
        frame_size(10, 2500, 4, VideoSettings())


def test_default_pixel_bounds_follow_patch_size():
    assert VideoSettings().frame_min_pixels == 128 * 28 * 28
    assert VideoSettings(patch_size=16).frame_max_pixels == 768 * 32 * 32
    assert VideoSettings(min_pixels=1000, max_pixels=2000).frame_max_pixels == 2000


def test_invalid_settings_are_reported_together():
    with pytest.raises(ValueError) as info:
        VideoSettings(fps=0, min_frames=10, max_frames=5, min_pixels=10, max_pixels=5, backend="nope",
                      timeout_s=-1)
    message = str(info.value)
    for fragment in ("fps must be", "min_frames 10 is above", "min_pixels 10 is above", "backend must be",
                     "timeout_s"):
        assert fragment in message


def test_for_processor_takes_the_patch_sizes(processors):
    assert VideoSettings.for_processor(processors["qwen3_vl"]).patch_size == 16
    s = VideoSettings.for_processor(processors["qwen2_5_vl"], fps=1.0)
    assert (s.patch_size, s.merge_size, s.temporal_patch_size, s.fps) == (14, 2, 2, 1.0)
    assert math.isclose(VideoSettings.for_processor(processors["qwen2_vl"].video_processor).factor, 28)
