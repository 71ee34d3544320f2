"""Broken files, the time limit and the fallback between backends."""
from __future__ import annotations

import logging
import time

import pytest
import torch

from qwenvl.data.errors import DataError
from qwenvl.data.media import video_decode
from qwenvl.data.media.video import VideoSettings, load_video
from qwenvl.data.media.video_decode import DecodedVideo, register_backend, unregister_backend

BROKEN = ["corrupt.mp4", "truncated.mp4", "truncated_faststart.mp4", "empty.mp4", "zero_frames.mp4",
          "audio_only.m4a", "missing.mp4"]


@pytest.mark.parametrize("name", BROKEN)
def test_broken_files_raise_data_error_naming_the_file(video_dir, name):
    with pytest.raises(DataError) as info:
        load_video(video_dir / name)
    assert str(video_dir / name) in str(info.value)


@pytest.mark.parametrize("name", ["corrupt.mp4", "truncated.mp4", "truncated_faststart.mp4", "zero_frames.mp4"])
def test_each_backend_refuses_broken_files(video_dir, backend, name):
    with pytest.raises(DataError, match=backend) as info:
        load_video(video_dir / name, VideoSettings(backend=backend))
    assert str(video_dir / name) in str(info.value)


def test_empty_and_missing_say_so(video_dir):
    with pytest.raises(DataError, match="empty"):
        load_video(video_dir / "empty.mp4")
    with pytest.raises(DataError, match="not found"):
        load_video(video_dir / "missing.mp4")


@pytest.fixture
def fake_backends():
    """Register test backends under unique names and remove them afterwards."""
    added = []

    def add(name, fn):
        register_backend(name, fn)
        added.append(name)
        return name

    yield add
    for name in added:
        unregister_backend(name)


# Backends run in the reader process, so they are module-level functions (sent by reference).

def stuck(path, plan, num_threads):
    time.sleep(30)  # stands for a decoder that never returns
    raise RuntimeError("released")


def slow(path, plan, num_threads):
    time.sleep(0.2)
    indices = list(plan(10, 5.0))
    return DecodedVideo(torch.zeros(len(indices), 3, 56, 56, dtype=torch.uint8),
                        [i / 5.0 for i in indices], indices, 10, 5.0)


def broken(path, plan, num_threads):
    raise RuntimeError("cannot read this container")


def test_a_stuck_decoder_is_stopped_at_the_time_limit(video_dir, fake_backends):
    fake_backends("stuck", stuck)
    load_video(video_dir / "1s_24fps.mp4", VideoSettings(backend="pyav", timeout_s=60))  # the reader started
    start = time.monotonic()
    with pytest.raises(DataError, match=r"stuck.*0\.3 s limit") as info:
        load_video(video_dir / "1s_24fps.mp4", VideoSettings(backend="stuck", timeout_s=0.3))
    assert time.monotonic() - start < 5.0
    assert str(video_dir / "1s_24fps.mp4") in str(info.value)


def test_a_slow_but_timely_decoder_is_waited_for(video_dir, fake_backends):
    fake_backends("slow", slow)
    clip = load_video(video_dir / "1s_24fps.mp4", VideoSettings(backend="slow", timeout_s=5, min_pixels=56 * 56))
    assert clip.backend == "slow" and clip.frame_indices == [0, 3, 6, 9]


def test_auto_falls_back_and_warns_once_per_backend(video_dir, fake_backends, monkeypatch, caplog):
    fake_backends("broken", broken)
    monkeypatch.setattr(video_decode, "AUTO_ORDER", ("broken", "pyav"))
    monkeypatch.setattr(video_decode, "_warned", set())
    if video_decode.import_problem("pyav"):
        pytest.skip("PyAV is not installed")
    with caplog.at_level(logging.DEBUG, logger="qwenvl.data.media.video_decode"):
        for _ in range(3):
            clip = load_video(video_dir / "1s_24fps.mp4", VideoSettings(min_pixels=56 * 56, max_pixels=56 * 56))
            assert clip.backend == "pyav"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "broken" in warnings[0].getMessage() and "cannot read this container" in warnings[0].getMessage()
    assert "1s_24fps.mp4" in warnings[0].getMessage()


def test_registry_guards_names(fake_backends):
    with pytest.raises(ValueError, match="reserved"):
        register_backend("auto", lambda *a: None)
    with pytest.raises(ValueError, match="already registered"):
        register_backend("pyav", lambda *a: None)
    with pytest.raises(ValueError, match="built-in"):
        unregister_backend("decord")
    with pytest.raises(ValueError, match="module-level function"):
        register_backend("nested", lambda *a: None)  # the reader process could not import it
