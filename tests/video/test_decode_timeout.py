"""A read that passes ``--media_timeout`` is stopped, not abandoned.

Reads under a time limit run in a reader process (``qwenvl.data.media.time_limit``); on
time-out it is killed and reaped.  These tests count the threads and child processes
of the test process before and after: a timed-out decode leaves nothing running, and
repeated time-outs do not pile up (each used to leave a thread decoding forever).
Frames read through the reader equal those read in this process.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl.data.errors import DataError, DataKind
from qwenvl.data.media.read import image_header, open_image
from qwenvl.data.media.time_limit import reader_pids
from qwenvl.data.media.video import VideoSettings, load_video
from qwenvl.data.media.video_decode import register_backend, unregister_backend
from tests.commands import run_command

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Backends run in the reader process: module-level functions, sent by reference.

def hang(path, plan, num_threads):
    time.sleep(600)  # a decoder blocked in a read that never returns (the GIL released)


def spin(path, plan, num_threads):
    while True:  # a decoder looping while holding the GIL: a thread doing this could never be stopped
        pass


def crash(path, plan, num_threads):
    os.kill(os.getpid(), signal.SIGSEGV)  # what a decoder's bug does to the process it runs in


@pytest.fixture(scope="module", autouse=True)
def test_backends():
    for fn in (hang, spin, crash):
        register_backend(fn.__name__, fn)
    yield
    for fn in (hang, spin, crash):
        unregister_backend(fn.__name__)


def children() -> set[int]:
    """The live child processes of this process (zombies, already dead, are not counted)."""
    pids = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            pids |= {int(p) for p in f.read().split()}
    return {p for p in pids if alive(p)}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_dead(pid: int, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    return not alive(pid)


def test_timed_out_decodes_leave_no_thread_or_process_and_do_not_pile_up(video_dir):
    video = video_dir / "1s_24fps.mp4"
    load_video(video, VideoSettings(backend="pyav", timeout_s=60))  # the reader is up (its start is not timed)
    threads, processes = threading.enumerate(), children()
    assert reader_pids() and set(reader_pids()) <= processes
    for backend in ("hang", "spin", "hang"):
        used = reader_pids()
        with pytest.raises(DataError, match=rf"{backend}.*0\.5 s limit.*--media_timeout") as err:
            load_video(video, VideoSettings(backend=backend, timeout_s=0.5))
        assert err.value.kind is DataKind.MEDIA_TIMEOUT and str(video) in str(err.value)
        assert not any(alive(pid) for pid in used)  # killed and reaped at the time-out
        assert threading.enumerate() == threads  # no reading thread left behind
        assert len(children()) <= len(processes) and len(reader_pids()) <= 1  # nothing piles up (one spare)
    clip = load_video(video, VideoSettings(backend="pyav", timeout_s=60))  # a new reader serves the next read
    assert clip.frames.shape[0] > 0 and len(children()) <= len(processes)


@pytest.mark.slow  # starts a second reader (imports torch): seconds
def test_a_decoder_crash_is_a_bad_video_not_a_dead_worker(video_dir):
    with pytest.raises(DataError, match=r"crash: ReaderDied: .*SIGSEGV") as err:
        load_video(video_dir / "1s_24fps.mp4", VideoSettings(backend="crash", timeout_s=60))
    assert err.value.kind is DataKind.BAD_VIDEO
    assert load_video(video_dir / "1s_24fps.mp4", VideoSettings(backend="pyav", timeout_s=60)).frames.shape[0] > 0


def test_stalled_downloads_stop_at_the_limit_and_leave_nothing(silent_server, tmp_path):
    pytest.importorskip("aiohttp")
    open_image(_png(tmp_path), timeout_s=60)  # the reader is up
    threads, processes = threading.enumerate(), children()
    reads = [lambda: load_video(f"{silent_server}/clip.mp4", VideoSettings(timeout_s=0.5)),
             lambda: open_image(f"{silent_server}/cat.png", timeout_s=0.5),
             lambda: image_header(f"{silent_server}/cat.png", timeout_s=0.5)] * 2
    for read in reads:
        used = reader_pids()
        with pytest.raises(DataError, match=r"0\.5 s.*--media_timeout") as err:
            read()
        assert err.value.kind is DataKind.MEDIA_TIMEOUT
        assert not any(alive(pid) for pid in used)
        assert threading.enumerate() == threads and len(children()) <= len(processes)


def _png(folder) -> str:
    path = folder / "warm.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    return str(path)


def test_frames_through_the_reader_equal_frames_read_here(video_dir, backend):
    for name in ("10s_25fps", "3s_60fps"):
        here = load_video(video_dir / f"{name}.mp4", VideoSettings(backend=backend, timeout_s=None))
        there = load_video(video_dir / f"{name}.mp4", VideoSettings(backend=backend, timeout_s=60))
        assert torch.equal(here.frames, there.frames) and here.frames.dtype == there.frames.dtype
        assert (here.frame_indices, here.timestamps, here.backend) == (there.frame_indices, there.timestamps,
                                                                       there.backend)


def test_images_through_the_reader_equal_images_read_here(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned: the reader applies the orientation as this process did
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", exif=exif, quality=90)
    Image.fromarray(pixels[..., 0]).save(tmp_path / "gray.png")
    for name in ("photo.jpg", "gray.png"):
        path = str(tmp_path / name)
        here, there = open_image(path, timeout_s=None), open_image(path, timeout_s=60)
        assert here.mode == there.mode == "RGB" and np.array_equal(np.asarray(here), np.asarray(there))
        assert image_header(path, timeout_s=None) == image_header(path, timeout_s=60)
    assert image_header(str(tmp_path / "photo.jpg"), timeout_s=60) == (53, 37)


def test_the_reader_dies_with_its_parent(tmp_path):
    """A trainer killed with SIGKILL leaves no reader behind, even one in the middle of a read."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import functools, sys, time
        sys.path.insert(0, {REPO!r})
        from qwenvl.data.media.time_limit import reader_pids, run_with_timeout
        run_with_timeout(functools.partial(sum, [1, 2]), 60, "warm-up")
        print(reader_pids()[0], flush=True)
        run_with_timeout(functools.partial(time.sleep, 600), 600, "a read that hangs")
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        reader = int(parent.stdout.readline())
        time.sleep(1.0)  # the reader is now in the hanging read
        assert alive(reader)
    finally:
        parent.kill()
        parent.wait()
    assert wait_dead(reader), "the reader outlived its parent"


@pytest.mark.parametrize("closed", ["0", "0 1", "0 2"], ids=["stdin", "stdin+stdout", "stdin+stderr"])
def test_reads_work_in_a_process_started_with_closed_standard_streams(tmp_path, closed):
    """A job launcher may start the trainer with stdin (or stdout) closed: os.pipe() then hands out
    descriptors 0-2, which the reader's own stdin=/dev/null used to overwrite (every read failed with
    "the reader process exited")."""
    Image.fromarray(np.full((20, 30, 3), 200, dtype=np.uint8)).save(tmp_path / "a.png")
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {REPO!r})
        from qwenvl.data.media.read import image_header
        result = f"{{[n for n in (0, 1, 2) if not os.path.exists(f'/proc/self/fd/{{n}}')]}} {{image_header({str(tmp_path / 'a.png')!r}, timeout_s=60)}}"
        open({str(tmp_path / 'result')!r}, "w").write(result)
    """))
    closing = " ".join(f"{n}>&-" if n != "0" else "<&-" for n in closed.split())
    result = run_command(["bash", "-c", f"{sys.executable} {script} {closing}"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = image_header(str(tmp_path / "a.png"), timeout_s=None)  # read here, without a reader
    assert (tmp_path / "result").read_text() == f"{[int(n) for n in closed.split()]} {expected}"


def _load_in_worker(path):
    clip = load_video(path, VideoSettings(backend="pyav", timeout_s=60))
    return clip.frames, torch.tensor(reader_pids()), torch.tensor(os.getpid())


class _Videos(torch.utils.data.Dataset):
    def __init__(self, path):
        self.path = path

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return _load_in_worker(self.path)


@pytest.mark.slow  # two workers, each starting a reader
def test_dataloader_workers_each_use_their_own_reader(video_dir):
    """Workers are forked (daemonic) processes: each starts its own reader, never uses the parent's,
    and their readers end with them."""
    path = str(video_dir / "1s_24fps.mp4")
    expected = load_video(path, VideoSettings(backend="pyav", timeout_s=60)).frames  # this process's reader
    mine = set(reader_pids())
    loader = torch.utils.data.DataLoader(_Videos(path), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    readers, workers = set(), set()
    for frames, pids, worker in loader:
        assert torch.equal(frames, expected)
        assert len(pids) == 1
        readers.add(int(pids[0]))
        workers.add(int(worker))
    assert len(workers) == 2 and len(readers) == 2 and not readers & mine
    del loader
    assert all(wait_dead(pid) for pid in readers)  # gone with their workers
    assert set(reader_pids()) == mine and all(alive(pid) for pid in mine)


def test_the_reader_sees_no_gpu():
    """CUDA is never initialised in the reader: it is started with no visible device."""
    import functools

    from qwenvl.data.media.time_limit import run_with_timeout

    assert run_with_timeout(functools.partial(os.getenv, "CUDA_VISIBLE_DEVICES"), 60, "env") == ""


def test_a_failed_read_keeps_its_reader(video_dir):
    """Bad data is an answer, not a reason to restart the reader (that costs seconds of imports)."""
    load_video(video_dir / "1s_24fps.mp4", VideoSettings(backend="pyav", timeout_s=60))
    readers = reader_pids()
    for name in ("corrupt.mp4", "truncated.mp4"):
        with pytest.raises(DataError):
            load_video(video_dir / name, VideoSettings(timeout_s=60))
    assert reader_pids() == readers
