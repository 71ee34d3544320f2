"""How fast and how lean are the annotation indexes on 1,000,000 records?

Writes a JSONL file and a JSON-array file of LLaVA-style records into a temp
dir, then, for each, in a fresh Python process per measurement (so memory
figures are not polluted by the generator or by the other case):

* ``scan``: open without a cache (index built by scanning the file),
* ``scan+save``: open with the sidecar cache enabled and no sidecar yet,
* ``load``: open again, reading the sidecar,

recording the open time, the RSS increase after opening (and its peak while
building), and the mean time of random single-record reads. Prints a table last
and writes JSON (``--output``, default benchmarks/results/index_memory.json).

    python benchmarks/index_memory.py [--records 1000000] [--reads 20000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc, else psutil)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil
        return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def record(i: int) -> dict:
    return {"id": f"{i:09d}", "image": f"coco/train2017/{i:012d}.jpg", "conversations": [
        {"from": "human", "value": f"<image>\nWhat is shown in picture {i}? Answer briefly."},
        {"from": "gpt", "value": f"A photo with {i % 17} objects, e.g. a \"cat\" [{i % 5}]."}]}


def generate(folder: Path, n: int) -> tuple[Path, Path]:
    """Write the same n records as JSONL and as a pretty-ish JSON array, streaming."""
    jsonl, jarr = folder / "records.jsonl", folder / "records.json"
    with open(jsonl, "w", encoding="utf-8") as fl, open(jarr, "w", encoding="utf-8") as fa:
        fa.write("[\n")
        for i in range(n):
            line = json.dumps(record(i), ensure_ascii=False)
            fl.write(line + "\n")
            fa.write(("  " if i == 0 else ",\n  ") + line)
        fa.write("\n]\n")
    return jsonl, jarr


def measure(path: str, cache: bool, reads: int) -> dict:
    """Runs in a fresh process: open the file, then time random reads."""
    import numpy as np

    from qwenvl.data.catalog.sources import open_annotations

    base = rss_bytes()
    t0 = time.perf_counter()
    src = open_annotations(path, cache=cache)
    open_s = time.perf_counter() - t0
    after_open = rss_bytes()
    peak = peak_rss_bytes()
    idx = np.random.default_rng(0).integers(0, len(src), size=reads)
    t0 = time.perf_counter()
    for i in idx.tolist():
        src[i]
    read_s = time.perf_counter() - t0
    return {"records": len(src), "open_s": open_s, "rss_open_mb": (after_open - base) / 2**20,
            "rss_peak_mb": max(0, peak - base) / 2**20,
            "rss_after_reads_mb": (rss_bytes() - base) / 2**20,
            "read_us": read_s / reads * 1e6, "index_bytes": int(src.offsets.nbytes)}


def run_case(path: Path, cache: bool, reads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_measure", str(path), "--reads", str(reads)]
                         + (["--_cache"] if cache else []), capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--reads", type=int, default=20_000)
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/index_memory.json"))
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    parser.add_argument("--_cache", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:
        print(json.dumps(measure(args._measure, args._cache, args.reads)))
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="qwenvl_index_bench_") as tmp:
        t0 = time.perf_counter()
        files = generate(Path(tmp), args.records)
        gen_s = time.perf_counter() - t0
        for path in files:
            size_mb = path.stat().st_size / 2**20
            for mode, cache in (("scan", False), ("scan+save", True), ("load", True)):
                rows.append({"file": path.name, "size_mb": size_mb, "mode": mode,
                             **run_case(path, cache, args.reads)})

    result = {"records": args.records, "reads": args.reads, "generate_s": gen_s,
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "platform": platform.platform()}, "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")

    print(f"wrote {args.output}; generating the files took {gen_s:.1f} s")
    header = (f"{'file':<14}{'MB':>8}  {'mode':<10}{'records':>10}{'open s':>9}{'RSS MB':>9}"
              f"{'peak MB':>9}{'read us':>9}{'index MB':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['file']:<14}{r['size_mb']:>8.1f}  {r['mode']:<10}{r['records']:>10,}"
              f"{r['open_s']:>9.3f}{r['rss_open_mb']:>9.1f}{r['rss_peak_mb']:>9.1f}"
              f"{r['read_us']:>9.1f}{r['index_bytes'] / 2**20:>10.1f}")


if __name__ == "__main__":
    main()
