"""How full are the packs? Fill ratios of the packing algorithms on the demo mix, for a few budgets.

Counts every sample of one epoch of the demo mix (all six demo datasets at their
dictionary rates, seed 42) exactly with a tiny Qwen2.5-VL and the README's demo
pixel settings (``--max_pixels 112*112 --min_pixels 56*56 --video_max_pixels 56*56
--video_min_pixels 28*28``, 4-8 frames), then packs them for each token budget with:

* ``bfd`` / ``ffd``: best- / first-fit decreasing (``qwenvl.data.batch.packing``; what
  ``pack_data`` and online packing use, ``bfd`` by default);
* ``next_fit``: samples in a shuffled order, a new pack whenever the next one does
  not fit (what concatenating a stream gives; the baseline);
* ``online x4``: the online-packing sampler's packs for 4 ranks (after splitting
  packs so the count divides by 4);
* ``bfd+patches``: bfd with a vision-patch budget equal to the token budget (a
  visual token is 4 patches, so on this mix the patch budget binds first).

The same is measured on a synthetic mix of ``--synthetic`` samples drawn (with
replacement) from the demo lengths, to show the algorithms at scale (with timings).

``bound`` is the best fill any packing can reach: total / (ceil(total / budget) x budget).
Fill ratio = tokens used / (packs x budget).  Lengths are counted in memory (nothing
is written next to the demo data).  Prints the table last and writes JSON
(``--output``, default benchmarks/results/packing_fill.json).

    python benchmarks/packing_fill.py [--model DIR] [--budgets 256,512,1024,2048,4096] [--synthetic 100000]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

DEMO = "demo_shapes,demo_shapes_eval,demo_multi_image,demo_grounding,demo_text,demo_video"
PIXELS = dict(max_pixels=112 * 112, min_pixels=56 * 56, video_max_pixels=56 * 56, video_min_pixels=28 * 28,
              video_max_frames=8, video_min_frames=4)


def demo_lengths(model: str, budgets: list[int], seed: int = 42) -> dict[int, np.ndarray]:
    """{budget: (n, 3) length rows of one epoch of the demo mix, fitted to that budget}."""
    from transformers import AutoProcessor

    from qwenvl.data.arguments import DataArguments
    from qwenvl.data.batch.count import TokenCounter
    from qwenvl.data.batch.length_cache import build_lengths, fit_to_max_length
    from qwenvl.data.catalog.mixture import build_mixture
    from qwenvl.data.catalog.registry import load_dictionary, parse_dataset_use
    from qwenvl.data.catalog.sources import open_annotations
    from qwenvl.data.media.video import video_settings_from
    from qwenvl.data.render.processor_settings import configure_processor

    args = DataArguments(dataset_use=DEMO, **PIXELS)
    processor = configure_processor(AutoProcessor.from_pretrained(model), args)
    counter = TokenCounter(processor, video_settings_from(args, processor))
    entries = parse_dataset_use(DEMO, load_dictionary())
    sources = [open_annotations(e.spec.annotation_path) for e in entries]
    full = [build_lengths(e.spec, s, counter, progress=False) for e, s in zip(entries, sources)]
    mixture = build_mixture(entries, [len(s) for s in sources], seed).tolist()
    out = {}
    for budget in budgets:
        capped = counter.with_max_length(budget)
        tables = [fit_to_max_length(t, e.spec, s, capped, budget) for t, e, s in zip(full, entries, sources)]
        out[budget] = np.stack([tables[d].rows[r] for d, r in mixture])
    return out


def synthetic(rows: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` rows drawn with replacement from ``rows``: a large mix with the demo's length profile."""
    usable = rows[rows[:, 0] > 0]
    return usable[np.random.default_rng(seed).integers(0, usable.shape[0], n)]


def measure(rows: np.ndarray, budget: int, seed: int = 42) -> dict:
    from qwenvl.data.batch.packing import pack_items
    from qwenvl.data.batch.sampler import OnlinePackingBatchSampler

    tokens, patches = rows[:, 0], rows[:, 2]
    usable = np.flatnonzero(tokens > 0)
    total = int(tokens[usable].sum())
    out = {"budget": budget, "samples": int(usable.size), "tokens": total,
           "bound": total / (math.ceil(total / budget) * budget)}
    for name in ("bfd", "ffd"):
        t = time.perf_counter()
        r = pack_items(tokens, budget, items=usable, algorithm=name)
        out[name] = {"packs": len(r.packs), "fill": r.fill_ratio, "seconds": time.perf_counter() - t}
    order = usable[np.random.default_rng(seed).permutation(usable.size)]
    r = pack_items(tokens, budget, items=order, algorithm="next_fit")
    out["next_fit"] = {"packs": len(r.packs), "fill": r.fill_ratio}
    sampler = OnlinePackingBatchSampler(rows, budget, seed=seed, world_size=4, rank=None)
    out["online x4"] = {"packs": len(sampler), "fill": sampler.fill_ratio()}
    r = pack_items(tokens, budget, patches, budget, items=usable, algorithm="bfd")
    out["bfd+patches"] = {"packs": len(r.packs), "fill": r.fill_ratio, "patch_fill": r.patch_fill_ratio,
                          "dropped": len(r.dropped), "max_patches": budget}
    return out


def _table(title: str, results: list[dict]) -> list[str]:
    cols = ["bfd", "ffd", "next_fit", "online x4", "bfd+patches"]
    lines = [title, f"{'budget':>6} {'samples':>7} {'tokens':>8} {'bound':>6} " + " ".join(f"{c:>17}" for c in cols)]
    for r in results:
        cells = " ".join(f"{r[c]['fill']:>8.2%} ({r[c]['packs']:>6})" for c in cols)
        lines.append(f"{r['budget']:>6} {r['samples']:>7} {r['tokens']:>8} {r['bound']:>6.1%} {cells}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a tiny (or real) Qwen2.5-VL checkpoint; default: build a tiny one")
    parser.add_argument("--budgets", default="256,512,1024,2048,4096")
    parser.add_argument("--synthetic", type=int, default=100_000, help="samples of the synthetic mix (0: skip)")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "packing_fill.json"))
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from qwenvl.tools.make_tiny_model import make_tiny_model
            model = str(make_tiny_model("qwen2_5_vl", Path(tmp) / "tiny"))
        t = time.perf_counter()
        rows = demo_lengths(model, budgets)
        count_seconds = time.perf_counter() - t
    demo = [measure(rows[b], b) for b in budgets]
    big = [measure(synthetic(rows[b], args.synthetic), b) for b in budgets] if args.synthetic else []
    payload = {"question": "fill ratio of packing the demo mix", "datasets": DEMO, "pixels": PIXELS,
               "python": platform.python_version(), "machine": platform.machine(),
               "count_seconds": round(count_seconds, 2), "demo": demo, "synthetic": big}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.output}")
    lines = _table("fill ratio (packs), one epoch of the demo mix, tiny Qwen2.5-VL, demo pixel settings", demo)
    if big:
        lines += [""] + _table(f"fill ratio (packs), {args.synthetic} samples drawn from the demo lengths", big)
        lines.append("bfd seconds: " + ", ".join(f"{r['budget']}: {r['bfd']['seconds']:.2f}" for r in big)
                     + "; ffd seconds: " + ", ".join(f"{r['budget']}: {r['ffd']['seconds']:.2f}" for r in big))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
