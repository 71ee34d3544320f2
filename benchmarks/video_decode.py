"""How fast does each video backend deliver the sampled frames of a typical clip?

Generates H.264 test videos into a temp dir (default: 640x360, 30 s at 30 fps with
libx264's default GOP, and 1280x720, 10 s at 30 fps), then for each installed backend
and two sampling settings, in this process after one warm-up run:

* ``sparse``: the default 2 fps (60 of 900 frames, as in training),
* ``dense``: every frame (``fps`` = source rate, ``max_frames`` = all frames),

times ``decode_video`` alone (the backend: open, index, decode the sampled frames;
wall and CPU seconds) and ``load_video`` (decode plus resize to the default pixel
bounds), median of ``--repeats`` runs.  "sampled f/s" counts the frames returned per
wall second, "sampled f/cpu-s" per CPU second of this process (steadier when other
work shares the cores); "source f/s" counts the video's frames covered per wall
second (decoders decode every frame between key frames: the traversal speed).
Prints a table last and writes JSON (``--output``, default
benchmarks/results/video_decode.json).

    python benchmarks/video_decode.py [--repeats 3] [--threads 0] [--backends torchcodec,pyav]
"""
from __future__ import annotations

import argparse
import dataclasses
import fractions
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import numpy as np  # noqa: E402

from qwenvl.data.media.video import VideoSettings, load_video, sample_frame_indices  # noqa: E402
from qwenvl.data.media.video_decode import decode_video, installed_backends  # noqa: E402

VIDEOS = [  # (width, height, seconds, fps)
    (640, 360, 30, 30),
    (1280, 720, 10, 30),
]


def make_video(path: Path, width: int, height: int, seconds: int, fps: int) -> int:
    """A moving square over a textured, drifting background, H.264 with libx264's defaults."""
    import av

    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (height, width * 2, 3), dtype=np.uint8)
    count = seconds * fps
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fractions.Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast"}
        side = height // 4
        for i in range(count):
            shift = (i * 4) % width
            image = texture[:, shift:shift + width].copy()
            x, y = (i * 7) % (width - side), (i * 3) % (height - side)
            image[y:y + side, x:x + side] = (255, 64, 0)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return count


def median_time(fn, repeats: int) -> tuple[float, float, object]:
    """Median wall seconds and median CPU seconds (all threads of this process) of ``fn()``.

    CPU time is reported beside wall time because it barely moves when other
    processes share the cores, where wall time does.
    """
    fn()  # warm-up: imports, file cache
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="decoder threads (0: the decoder chooses)")
    parser.add_argument("--backends", default=None, help="comma-separated; default: every installed one")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "video_decode.json"))
    args = parser.parse_args()

    backends = args.backends.split(",") if args.backends else installed_backends()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for width, height, seconds, fps in VIDEOS:
            path = Path(tmp) / f"{width}x{height}_{seconds}s_{fps}fps.mp4"
            start = time.perf_counter()
            total = make_video(path, width, height, seconds, fps)
            print(f"generated {path.name}: {total} frames, {path.stat().st_size / 1e6:.1f} MB "
                  f"in {time.perf_counter() - start:.1f} s", flush=True)
            samplings = {
                "sparse": VideoSettings(num_threads=args.threads),
                "dense": VideoSettings(fps=float(fps), max_frames=total, num_threads=args.threads),
            }
            for sampling, base in samplings.items():
                reference = None
                for backend in backends:
                    settings = dataclasses.replace(base, backend=backend)

                    def plan(n, rate, settings=settings):
                        return sample_frame_indices(n, rate, settings)

                    decode_s, decode_cpu_s, (decoded, _) = median_time(
                        lambda: decode_video(str(path), plan, backend, None, args.threads), args.repeats)
                    load_s, _, clip = median_time(lambda: load_video(path, settings), args.repeats)
                    n = len(decoded.indices)
                    if reference is None:
                        reference = decoded.indices
                    rows.append({
                        "video": path.name, "sampling": sampling, "backend": backend, "threads": args.threads,
                        "frames_sampled": n, "frames_in_file": decoded.total_frames,
                        "same_indices_as_first_backend": decoded.indices == reference,
                        "decode_s": round(decode_s, 4), "decode_cpu_s": round(decode_cpu_s, 4),
                        "sampled_frames_per_s": round(n / decode_s, 1),
                        "sampled_frames_per_cpu_s": round(n / decode_cpu_s, 1),
                        "source_frames_per_s": round(decoded.total_frames / decode_s, 1),
                        "load_video_s": round(load_s, 4),
                        "output_size": list(clip.frames.shape),
                    })
                    print(f"  {sampling:6s} {backend:10s} {decode_s:7.3f} s", flush=True)

    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg()},
        "repeats": args.repeats, "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)

    header = ("video", "sampling", "backend", "frames", "decode s", "cpu s", "sampled f/s", "sampled f/cpu-s",
              "source f/s", "load_video s")
    lines = [header] + [
        (r["video"], r["sampling"], r["backend"], f"{r['frames_sampled']}/{r['frames_in_file']}",
         f"{r['decode_s']:.3f}", f"{r['decode_cpu_s']:.3f}", f"{r['sampled_frames_per_s']:.0f}",
         f"{r['sampled_frames_per_cpu_s']:.0f}", f"{r['source_frames_per_s']:.0f}",
         f"{r['load_video_s']:.3f}") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print(f"\nwrote {args.output}  ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"threads={args.threads}, median of {args.repeats})")
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))


if __name__ == "__main__":
    main()
