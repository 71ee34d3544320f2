"""What does running media reads in the reader process cost, next to reading in this process?

Reads under ``--media_timeout`` run in a reader process that is killed on time-out
(``qwenvl/data/media/time_limit.py``).  For each read this times, side by side (round robin,
median of ``--repeats``, after a warm-up that starts the reader):

* ``inline``: the read in this process, no time limit (``timeout_s=None``),
* ``thread``: the read in a thread joined with a time limit (what the code did before:
  on time-out that thread kept running),
* ``reader``: the read in the reader process (what the code does now),

for a video decode (H.264, sparse 2 fps sampling as in training, and every frame),
a JPEG image read and an image header read.  The ratio ``reader / thread`` is the
overhead per read.  It also reports how long a new reader takes to start (importing
torch, transformers and the decoders) and its memory (RSS, and the private part, USS).
Prints a table last and writes JSON (``--output``, default benchmarks/results/reader_overhead.json).

    python benchmarks/reader_overhead.py [--repeats 7] [--backend pyav]
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from qwenvl.data.media import time_limit  # noqa: E402
from qwenvl.data.media.read import image_header, open_image  # noqa: E402
from qwenvl.data.media.video import VideoSettings, load_video  # noqa: E402
from qwenvl.data.media.video_decode import installed_backends  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from video_decode import make_video  # noqa: E402


def in_thread(fn, timeout_s: float):
    """The former time limit: ``fn`` in a daemon thread, joined for ``timeout_s`` seconds."""
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("value", fn()), daemon=True)
    thread.start()
    thread.join(timeout_s)
    return box["value"]


def memory(pid: int) -> dict:
    """RSS and USS (private memory: what one more reader costs) in MiB, from /proc."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()[-1] == "kB"}
        out["rss_mib"] = round(fields["Rss"] / 1024, 1)
        out["uss_mib"] = round((fields["Private_Clean"] + fields["Private_Dirty"]) / 1024, 1)
    except (OSError, KeyError):
        pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backend", default=None, help="video backend (default: the first installed)")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "reader_overhead.json"))
    args = parser.parse_args()
    backend = args.backend or installed_backends()[0]

    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "640x360_10s_30fps.mp4"
        make_video(video, 640, 360, 10, 30)
        photo = Path(tmp) / "photo.jpg"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8)).save(photo, quality=90)

        sparse = VideoSettings(backend=backend)
        dense = VideoSettings(backend=backend, fps=30.0, max_frames=300)
        reads = {  # name -> read(timeout_s)
            f"video {backend} sparse (2 fps)": lambda t: load_video(video, replace(sparse, timeout_s=t)),
            f"video {backend} dense (30 fps)": lambda t: load_video(video, replace(dense, timeout_s=t)),
            "image 1280x720 jpeg": lambda t: open_image(str(photo), timeout_s=t),
            "image header": lambda t: image_header(str(photo), timeout_s=t),
        }

        start = time.perf_counter()
        reads["image header"](60)  # starts the reader
        for read in reads.values():
            read(60)  # imports torch and the decoder in the reader
        first_s = time.perf_counter() - start
        reader = time_limit.reader_pids()[0]
        mem = memory(reader)

        rows = []
        for name, read in reads.items():
            times = {"inline": [], "thread": [], "reader": []}
            methods = {"inline": lambda: read(None), "thread": lambda: in_thread(lambda: read(None), 600),
                       "reader": lambda: read(600)}
            for fn in methods.values():
                fn()  # warm-up
            for _ in range(args.repeats):
                for method, fn in methods.items():
                    t = time.perf_counter()
                    fn()
                    times[method].append(time.perf_counter() - t)
            med = {m: statistics.median(v) for m, v in times.items()}
            rows.append({"read": name, **{f"{m}_ms": round(v * 1000, 3) for m, v in med.items()},
                         "reader_over_thread": round(med["reader"] / med["thread"], 3),
                         "added_ms": round((med["reader"] - med["thread"]) * 1000, 3)})
            print(f"  {name:32s} {rows[-1]}", flush=True)

        # A reader started after a time-out: the time until it answers its first read.
        time_limit._all[0].kill()
        time_limit._idle.clear()
        start = time.perf_counter()
        reads[f"video {backend} sparse (2 fps)"](600)
        restart_s = time.perf_counter() - start

    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg()},
        "repeats": args.repeats, "backend": backend, "rows": rows,
        "reader": {"first_reads_s": round(first_s, 2), "start_after_kill_s": round(restart_s, 2), **mem},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)

    header = ("read", "inline ms", "thread ms", "reader ms", "reader/thread", "added ms")
    lines = [header] + [(r["read"], f"{r['inline_ms']:.2f}", f"{r['thread_ms']:.2f}", f"{r['reader_ms']:.2f}",
                         f"{r['reader_over_thread']:.2f}", f"{r['added_ms']:.2f}") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print(f"\nwrote {args.output}  ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"median of {args.repeats})")
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))
    print(f"reader: first reads (start, imports) {first_s:.1f} s; a new reader's first read {restart_s:.1f} s; "
          f"memory {mem}")


if __name__ == "__main__":
    main()
