"""Decoding generated videos with each backend: counts, indices, times, content, agreement."""
from __future__ import annotations

import pytest
import torch

from qwenvl.data.errors import DataError
from qwenvl.data.media.video import VideoSettings, load_video, sample_frame_indices

# Small frames keep the tests fast: 64x48 sources resized to 2x2 merged patches.
SMALL = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 4)

EXPECTED = {  # name: (frames in file, fps, sampled count)
    "10s_25fps": (250, 25.0, 20),
    "3s_60fps": (180, 60.0, 6),
    "1s_24fps": (24, 24.0, 4),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_backend_samples_the_right_frames_at_the_right_times(video_dir, backend, name, read_frame_number):
    total, fps, count = EXPECTED[name]
    clip = load_video(video_dir / f"{name}.mp4", VideoSettings(backend=backend, **SMALL))
    assert clip.backend == backend
    assert clip.total_frames == total
    assert (clip.source_fps, clip.duration) == (pytest.approx(fps), pytest.approx(total / fps))
    assert clip.frame_indices == sample_frame_indices(total, fps, VideoSettings())
    assert len(clip.frame_indices) == count
    assert clip.frames.dtype == torch.uint8 and tuple(clip.frames.shape) == (count, 3, 56, 56)
    # The frames really are the ones the indices name: each carries its index in its pixels.
    assert [read_frame_number(f) for f in clip.frames] == clip.frame_indices
    assert clip.timestamps == pytest.approx([i / fps for i in clip.frame_indices], abs=1e-4)
    # The serving stack's rate (frames sampled per source frame, times the source rate).
    assert clip.sampled_fps == pytest.approx(count / total * fps)


@pytest.mark.parametrize("name,indices,rate", [("1s_24fps", [0, 8, 15, 23], 4.0),
                                               ("3s_60fps", [0, 36, 72, 107, 143, 179], 2.0)])
def test_short_video_rate_is_the_serving_rate(video_dir, backend, name, indices, rate):
    # The measurement: with --video_fps 2 --video_min_frames 4, serving gives these clips
    # second_per_grid_ts 0.5 and 1.0; one over the frames' spacing gave 0.64 and 1.19.
    clip = load_video(video_dir / f"{name}.mp4", VideoSettings(backend=backend, fps=2.0, min_frames=4, **SMALL))
    assert clip.frame_indices == indices
    assert clip.sampled_fps == pytest.approx(rate)
    assert clip.second_per_grid_t(2) == pytest.approx(2 / rate)


def test_all_installed_backends_agree(video_dir):
    from qwenvl.data.media.video_decode import installed_backends

    names = installed_backends()
    if len(names) < 2:
        pytest.skip(f"only {names} installed; nothing to compare")
    for video in EXPECTED:
        clips = [load_video(video_dir / f"{video}.mp4", VideoSettings(backend=n, **SMALL)) for n in names]
        for clip in clips[1:]:
            assert clip.frame_indices == clips[0].frame_indices
            assert clip.timestamps == pytest.approx(clips[0].timestamps, abs=1e-4)
            assert clip.sampled_fps == clips[0].sampled_fps
            assert clip.frames.shape == clips[0].frames.shape
            # Same decoded pixels up to colour-conversion rounding.
            assert (clip.frames.float() - clips[0].frames.float()).abs().mean() < 2.0


def test_auto_uses_the_first_installed_backend(video_dir):
    from qwenvl.data.media.video_decode import installed_backends

    clip = load_video(video_dir / "3s_60fps.mp4", VideoSettings(**SMALL))
    assert clip.backend == installed_backends()[0]


def test_frames_are_resized_to_merged_patch_multiples_within_bounds(video_dir):
    s = VideoSettings(patch_size=16, min_pixels=32 * 32 * 6, max_pixels=32 * 32 * 12)
    clip = load_video(video_dir / "3s_60fps.mp4", s)
    _, _, h, w = clip.frames.shape
    assert h % 32 == 0 and w % 32 == 0 and s.frame_min_pixels <= h * w <= s.frame_max_pixels
    default = load_video(video_dir / "1s_24fps.mp4")  # default bounds: at least 128 tokens a frame
    assert default.frames.shape[-2] * default.frames.shape[-1] >= 128 * 28 * 28


def test_frame_list_is_a_video_at_frame_list_fps(tmp_path, frames_writer, read_frame_number):
    paths = frames_writer(tmp_path / "frames", 9)
    clip = load_video([str(p) for p in paths], VideoSettings(**SMALL))
    # 9 frames at 2 fps: 4.5 s -> 9 wanted, 8 after rounding to the temporal patch.
    assert clip.backend == "images" and clip.total_frames == 9 and clip.source_fps == 2.0
    assert clip.frame_indices == [0, 1, 2, 3, 5, 6, 7, 8]
    assert [read_frame_number(f) for f in clip.frames] == clip.frame_indices
    assert clip.timestamps == pytest.approx([i / 2.0 for i in clip.frame_indices])
    slow = load_video(paths, VideoSettings(frame_list_fps=1.0, **SMALL))
    assert slow.duration == 9.0 and slow.timestamps[-1] == 8.0


def test_folder_frames_sort_by_name_with_numbers_in_order(tmp_path, frames_writer, read_frame_number):
    folder = tmp_path / "clip"
    frames_writer(folder, 12, names="img_{}.png")  # img_10 must come after img_9
    (folder / "notes.txt").write_text("not a frame")
    clip = load_video(folder, VideoSettings(fps=2.0, min_frames=12, max_frames=12, **SMALL))
    assert [read_frame_number(f) for f in clip.frames] == list(range(12))


def test_frame_list_with_a_missing_frame_names_it(tmp_path, frames_writer):
    paths = frames_writer(tmp_path / "frames", 6)
    paths[3].unlink()
    with pytest.raises(DataError, match=r"frame_3\.png.*frame 3 .*not found"):
        load_video(paths, VideoSettings(**SMALL))


def test_frame_of_another_size_is_named(tmp_path, frames_writer):
    paths = frames_writer(tmp_path / "frames", 4)
    frames_writer(tmp_path / "frames", 1, names="frame_{}.png", size=(32, 32))  # rewrites frame_0 at 32x32
    with pytest.raises(DataError, match=r"frame_1\.png.*one size"):
        load_video(paths, VideoSettings(**SMALL))


def test_unreadable_frame_and_empty_folder(tmp_path, frames_writer):
    paths = frames_writer(tmp_path / "frames", 4)
    paths[2].write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"frame_2\.png.*not a readable image"):
        load_video(paths, VideoSettings(**SMALL))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no images"):
        load_video(tmp_path / "empty")
    with pytest.raises(DataError, match="no frames"):
        load_video([])


@pytest.fixture(scope="module")
def containers(tmp_path_factory, video_maker) -> dict:
    """The same 3 s, 25 fps clip as MPEG-TS (pts start at 1.4 s), Matroska (no frame count in the
    header) and WebM/VP9."""
    folder = tmp_path_factory.mktemp("containers")
    paths = {"ts": folder / "clip.ts", "mkv": folder / "clip.mkv", "webm": folder / "clip.webm"}
    video_maker(paths["ts"], 3, 25)
    video_maker(paths["mkv"], 3, 25)
    video_maker(paths["webm"], 3, 25, codec="libvpx-vp9")
    return paths


@pytest.mark.parametrize("kind", ["ts", "mkv", "webm"])
def test_other_containers_give_the_same_clip(containers, backend, kind, read_frame_number):
    clip = load_video(containers[kind], VideoSettings(backend=backend, **SMALL))
    assert (clip.total_frames, clip.source_fps) == (75, pytest.approx(25.0))
    assert clip.frame_indices == [0, 15, 30, 44, 59, 74]
    assert [read_frame_number(f) for f in clip.frames] == clip.frame_indices
    # Times count from the first frame, whatever the container's first pts.
    assert clip.timestamps == pytest.approx([i / 25 for i in clip.frame_indices], abs=1e-4)


def test_urls_are_read_through_fsspec(video_dir, frames_writer, tmp_path, read_frame_number):
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")  # an in-process URL scheme: remote storage without a network
    memory.pipe("/qwenvl-test/clip.mp4", (video_dir / "3s_60fps.mp4").read_bytes())
    local = load_video(video_dir / "3s_60fps.mp4", VideoSettings(**SMALL))
    remote = load_video("memory://qwenvl-test/clip.mp4", VideoSettings(**SMALL))
    assert remote.frame_indices == local.frame_indices and remote.source == "memory://qwenvl-test/clip.mp4"
    assert torch.equal(remote.frames, local.frames)
    assert load_video(f"file://{video_dir / '3s_60fps.mp4'}", VideoSettings(**SMALL)).frame_indices == \
        local.frame_indices
    with pytest.raises(DataError, match="memory://qwenvl-test/nope.mp4.*not found"):
        load_video("memory://qwenvl-test/nope.mp4")
    for i, path in enumerate(frames_writer(tmp_path / "frames", 4)):
        memory.pipe(f"/qwenvl-test/f{i}.png", path.read_bytes())
    frames = load_video([f"memory://qwenvl-test/f{i}.png" for i in range(4)], VideoSettings(**SMALL))
    assert [read_frame_number(f) for f in frames.frames] == [0, 1, 2, 3]
    memory.rm("/qwenvl-test", recursive=True)


def test_origin_prefixes_the_message(video_dir):
    with pytest.raises(DataError, match=r"^dataset 'demo', record 7: file .*missing\.mp4: video not found"):
        load_video(video_dir / "missing.mp4", origin="dataset 'demo', record 7")


def test_resize_clip_shrinks_frames_and_keeps_timing(video_dir):
    from dataclasses import replace

    from qwenvl.data.media.video import resize_clip

    settings = VideoSettings()
    clip = load_video(video_dir / "3s_60fps.mp4", settings)
    small = resize_clip(clip, replace(settings, min_pixels=28 * 28, max_pixels=28 * 28 * 16))
    pixels = [c.frames.shape[-2] * c.frames.shape[-1] for c in (small, clip)]
    assert pixels[0] <= 28 * 28 * 16 < pixels[1]
    assert small.frames.shape[-2] % 28 == 0 and small.frames.shape[-1] % 28 == 0
    assert (small.frame_indices, small.timestamps, small.sampled_fps) == \
        (clip.frame_indices, clip.timestamps, clip.sampled_fps)


def test_single_frame_video_repeats_its_frame(tmp_path, backend, video_maker, read_frame_number):
    video_maker(tmp_path / "still.mp4", 1, 1)  # one frame: shorter than a temporal patch
    clip = load_video(tmp_path / "still.mp4", VideoSettings(backend=backend, **SMALL))
    assert clip.frame_indices == [0, 0] and clip.total_frames == 1
    assert [read_frame_number(f) for f in clip.frames] == [0, 0]
    # Two samples of one frame: transformers' sampled_fps (2 / 1 * fps), what the processor computes too.
    assert clip.timestamps == [0.0, 0.0] and clip.sampled_fps == 2 * clip.source_fps
