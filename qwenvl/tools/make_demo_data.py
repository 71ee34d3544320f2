"""Write the project's bundled demo data and the dictionary that registers it.

    python -m qwenvl.tools.make_demo_data [--output demo_data] [--seed 0]

Everything is drawn here (no files are copied from elsewhere): small images of
flat-coloured circles, squares and triangles on white, short H.264 clips of a
square moving sideways, and text-only arithmetic.  Every answer is a
deterministic function of the pixels (or of the question, for text), and each
kind of question uses one fixed wording, so a model can only get it right by
looking.  The images are small (56x56 up to 224x168, sides multiples of 28) so a
tiny Qwen2.5-VL fine-tunes on them in minutes on a CPU.

Datasets (name: annotation file, records):
  demo_shapes       shapes.json (JSON array)   single image; colour, shape or count
  demo_shapes_eval  shapes_eval.json           held-out split of the same task (own seed)
  demo_colour       colour.json                one big red, green or blue shape; its colour
  demo_colour_eval  colour_eval.json           held-out split of it: the demo's closing question
  demo_multi_image  multi_image.jsonl          two images; "more shapes?" / "same colour?"
  demo_grounding    grounding.jsonl            bbox_2d in pixels of the image file (bbox_format abs_original)
  demo_text         text.jsonl                 no media; arithmetic, multi-turn, system turns
  demo_video        video.json                 2 s, 8 fps clips; which way the square moves

Grounding images have sides that are not multiples of 28 or 32, so every family's
processor resizes them (and the demo's ``--max_pixels 12544`` shrinks most of them):
the boxes in the answers are pixels of the image files, declared with
``"bbox_format": "abs_original"`` in the dictionary, and training rewrites them into
each family's coordinates for the image as resized (``qwenvl/data/render/grounding.py``).

Same seed, same bytes: each dataset draws from its own ``random.Random`` seeded by
"<seed>:<dataset>", annotation files and PNGs are byte-identical across runs, and
JPEGs (Pillow) and MP4s (libx264 fed planes converted here, one thread,
CPU-independent algorithms, bit-exact muxing) are too on one machine.  The output is written to a temporary folder next to ``--output`` and
swapped in at the end, so an interrupted run leaves the old data intact.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

# Flat colours far apart in RGB and far from white, so a JPEG's centre pixel still
# lands nearest its own colour and a "not white" threshold finds every shape.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 170),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)
GAP = 6  # pixels kept between the boxes of two shapes, so they never touch, even in a JPEG

# Every question of one kind has the same text: the answer can only come from the media.
Q_COLOUR = "What colour is the shape?"
Q_SHAPE = "What shape is this?"
Q_COUNT = "How many shapes are there?"
Q_MORE = "Which image shows more shapes, the first or the second?"
Q_SAME = "Are the two shapes the same colour?"
Q_LOCATE = "Locate the {label}."
Q_DIRECTION = "Which way does the square move?"

# (width, height); sides are multiples of 28 (patch 14 x merge 2).
SIZES_ANY = [(56, 56), (84, 84), (112, 112), (112, 84), (84, 112), (140, 112), (168, 112), (224, 168), (168, 224)]
SIZES_MANY = [(112, 112), (112, 84), (140, 112), (168, 112), (224, 168), (168, 224)]  # room for 4 shapes
# Sides off the 28/32 grids, so every family's processor resizes them (the boxes must follow).
SIZES_GROUNDING = [(150, 110), (130, 130), (110, 150), (180, 120), (170, 90), (230, 170)]
VIDEO_SIZES = [(112, 84), (112, 112)]
VIDEO_FPS, VIDEO_FRAMES = 8, 16

JPEG_SHARE = 0.4  # the rest are PNG
README_MARKER = "# Demo data written by qwenvl.tools.make_demo_data"

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 with x2, y2 exclusive: the bbox_2d of the answers


# ---------------------------------------------------------------- drawing

def draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: Box, colour: tuple[int, int, int]) -> None:
    """Fill ``kind`` inside ``box`` (no anti-aliasing, so the PNG has exactly two colours)."""
    x1, y1, x2, y2 = box
    if kind == "square":
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=colour)
    elif kind == "circle":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=colour)
    elif kind == "triangle":  # apex up, base along the bottom of the box
        draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)], fill=colour)
    else:
        raise ValueError(f"unknown shape {kind!r}")


def place_boxes(rng: random.Random, size: tuple[int, int], n: int, side: tuple[int, int]) -> list[Box]:
    """``n`` square boxes with sides in ``side`` that keep GAP pixels apart and 2 from the edges."""
    w, h = size
    for _ in range(1000):
        boxes: list[Box] = []
        for _ in range(200):
            s = rng.randint(side[0], min(side[1], w - 4, h - 4))
            x, y = rng.randint(2, w - 2 - s), rng.randint(2, h - 2 - s)
            box = (x, y, x + s, y + s)
            if all(box[0] >= b[2] + GAP or b[0] >= box[2] + GAP or box[1] >= b[3] + GAP or b[1] >= box[3] + GAP
                   for b in boxes):
                boxes.append(box)
                if len(boxes) == n:
                    return boxes
    raise RuntimeError(f"could not place {n} shapes of side {side} in {size}")  # pragma: no cover


def shape_sides(size: tuple[int, int], n: int) -> tuple[int, int]:
    """Side range of a shape: big when alone, smaller when sharing the image."""
    short = min(size)
    if n == 1:
        return max(16, short * 3 // 10), short * 7 // 10
    return 16, max(18, short * 2 // 5 if n == 2 else short // 3)


@dataclass
class Shape:
    kind: str
    colour: str
    box: Box

    @property
    def label(self) -> str:
        return f"{self.colour} {self.kind}"


def render(size: tuple[int, int], shapes: list[Shape]) -> Image.Image:
    img = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in shapes:
        draw_shape(draw, s.kind, s.box, PALETTE[s.colour])
    return img


def random_shapes(rng: random.Random, size: tuple[int, int], n: int,
                  kinds: list[str] | None = None, colours: list[str] | None = None) -> list[Shape]:
    boxes = place_boxes(rng, size, n, shape_sides(size, n))
    return [Shape(kinds[i] if kinds else rng.choice(SHAPES),
                  colours[i] if colours else rng.choice(list(PALETTE)), box) for i, box in enumerate(boxes)]


def save_image(rng: random.Random, img: Image.Image, root: Path, stem: str) -> str:
    """Save as PNG or JPEG (chosen by ``rng``); return the path relative to ``root``."""
    if rng.random() < JPEG_SHARE:
        rel = f"{stem}.jpg"
        # 4:4:4 keeps chroma at full resolution, so small shapes keep their colour.
        img.save(root / rel, format="JPEG", quality=90, subsampling=0)
    else:
        rel = f"{stem}.png"
        img.save(root / rel, format="PNG")
    return rel


def conv(*turns: str, system: str | None = None) -> list[dict]:
    """LLaVA conversation from alternating human/gpt texts."""
    out = [{"from": "system", "value": system}] if system is not None else []
    out += [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]
    return out


def balanced(rng: random.Random, options: list, n: int) -> list:
    """``n`` items cycling through ``options``, shuffled: each option appears n/len times (+-1)."""
    items = [options[i % len(options)] for i in range(n)]
    rng.shuffle(items)
    return items


# ---------------------------------------------------------------- datasets

def build_shapes(rng: random.Random, root: Path, n: int, prefix: str) -> list[dict]:
    """Single-image questions: colour or shape of a lone shape, or how many shapes (1-4)."""
    (root / "images" / prefix).mkdir(parents=True)
    records = []
    for i, q in enumerate(balanced(rng, ["colour", "shape", "count"], n)):
        if q == "count":
            count = rng.randint(1, 4)
            size = rng.choice(SIZES_MANY if count > 1 else SIZES_ANY)
            shapes = random_shapes(rng, size, count)
            question, answer = Q_COUNT, str(count)
        else:
            size = rng.choice(SIZES_ANY)
            shapes = random_shapes(rng, size, 1)
            question, answer = (Q_COLOUR, shapes[0].colour) if q == "colour" else (Q_SHAPE, shapes[0].kind)
        rel = save_image(rng, render(size, shapes), root, f"images/{prefix}/{i:04d}")
        records.append({"id": f"{prefix}-{i:04d}", "image": rel,
                        "conversations": conv(f"<image>\n{question}", answer)})
    return records


COLOUR_SIZE = 112  # 16 visual tokens after the 2x2 merge: enough for a tiny model to see the colour
COLOUR_NAMES = ("red", "green", "blue")  # three colours far apart; the answer prior is 1/3 each
COLOUR_SIDE = (0.70, 0.95)  # a big shape: most patches carry its colour


def build_colour(rng: random.Random, root: Path, n: int, prefix: str) -> list[dict]:
    """One big red, green or blue shape on a 112x112 image; the question is always its colour.

    The task the demo's closing held-out question comes from: a tiny, randomly initialised
    model learns it from the pixels within the demo's steps, which the harder ``demo_shapes``
    questions (five colours, shapes down to 16 px, images down to 4 visual tokens) need far
    longer for (measured: the answer prior only).  Same task, settings and reasoning as
    ``tests/e2e/test_learns_from_pixels.py``; balanced, so no colour is the answer prior.
    """
    (root / "images" / prefix).mkdir(parents=True)
    size = (COLOUR_SIZE, COLOUR_SIZE)
    records = []
    for i, colour in enumerate(balanced(rng, list(COLOUR_NAMES), n)):
        side = rng.randint(int(COLOUR_SIZE * COLOUR_SIDE[0]), int(COLOUR_SIZE * COLOUR_SIDE[1]))
        x, y = rng.randint(0, COLOUR_SIZE - side), rng.randint(0, COLOUR_SIZE - side)
        shape = Shape(rng.choice(SHAPES), colour, (x, y, x + side, y + side))
        rel = save_image(rng, render(size, [shape]), root, f"images/{prefix}/{i:04d}")
        records.append({"id": f"{prefix}-{i:04d}", "image": rel,
                        "conversations": conv(f"<image>\n{Q_COLOUR}", colour)})
    return records


def build_multi_image(rng: random.Random, root: Path, n: int, prefix: str) -> list[dict]:
    """Two images per record: which shows more shapes, or are the two lone shapes the same colour."""
    (root / "images" / prefix).mkdir(parents=True)
    records = []
    for i, answer in enumerate(balanced(rng, ["first", "second", "yes", "no"], n)):
        if answer in ("first", "second"):
            more, fewer = sorted(rng.sample(range(1, 5), 2), reverse=True)
            counts = (more, fewer) if answer == "first" else (fewer, more)
            sizes = [rng.choice(SIZES_MANY) for _ in counts]
            pair = [(size, random_shapes(rng, size, k)) for size, k in zip(sizes, counts)]
            question = Q_MORE
        else:
            c1 = rng.choice(list(PALETTE))
            c2 = c1 if answer == "yes" else rng.choice([c for c in PALETTE if c != c1])
            sizes = [rng.choice(SIZES_ANY) for _ in (c1, c2)]
            pair = [(size, random_shapes(rng, size, 1, colours=[c])) for size, c in zip(sizes, (c1, c2))]
            question = Q_SAME
        rels = [save_image(rng, render(size, shapes), root, f"images/{prefix}/{i:04d}_{k}")
                for k, (size, shapes) in enumerate(pair)]
        records.append({"id": f"{prefix}-{i:04d}", "image": rels,
                        "conversations": conv(f"<image>\n<image>\n{question}", answer)})
    return records


def build_grounding(rng: random.Random, root: Path, n: int, prefix: str) -> list[dict]:
    """Locate one of 1-3 shapes with distinct labels; answer a bbox_2d in pixels of the image file."""
    (root / "images" / prefix).mkdir(parents=True)
    labels = [(k, c) for k in SHAPES for c in PALETTE]
    records = []
    for i in range(n):
        size = rng.choice(SIZES_GROUNDING)
        picked = rng.sample(labels, rng.randint(1, 3))
        shapes = random_shapes(rng, size, len(picked), kinds=[k for k, _ in picked], colours=[c for _, c in picked])
        target = rng.choice(shapes)
        answer = json.dumps({"bbox_2d": list(target.box), "label": target.label})
        rel = save_image(rng, render(size, shapes), root, f"images/{prefix}/{i:04d}")
        records.append({"id": f"{prefix}-{i:04d}", "image": rel,
                        "conversations": conv("<image>\n" + Q_LOCATE.format(label=target.label), answer)})
    return records


CALC_SYSTEM = "You are a calculator. Reply with the number only."


def _sum_question(rng: random.Random) -> tuple[str, int]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"What is {a} * {b}?", a * b
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", a - b
    return f"What is {a} + {b}?", a + b


def build_text(rng: random.Random, root: Path, n: int, prefix: str) -> list[dict]:
    """Text only: one-turn arithmetic, follow-ups on the previous answer, a few system turns."""
    records = []
    for i in range(n):
        q, value = _sum_question(rng)
        turns = [q, str(value)]
        if i % 5 == 4:  # a multi-turn follow-up that needs the previous answer
            k = rng.randint(1, 9)
            if rng.random() < 0.5:
                turns += [f"Now add {k}.", str(value + k)]
            else:
                turns += [f"Now multiply that by {k}.", str(value * k)]
        system = CALC_SYSTEM if i % 15 == 7 else None
        records.append({"id": f"{prefix}-{i:04d}", "conversations": conv(*turns, system=system)})
    return records


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """An RGB frame (H, W, 3; even sides) as one yuv420p array (H * 3 / 2, W), BT.601 limited range.

    Why by hand: with RGB frames converted by FFmpeg's swscale inside PyAV, two generations of the
    demo in one process gave different MP4 bytes (measured: 3 of 3 differ). Converting here, or
    x264's ``cpu-independent`` option, each made them repeat; ``write_video`` does both. Integer
    arithmetic gives the encoder the same planes every time; decoders read them back with the same
    (default, BT.601) matrix.
    """
    rgb = frame.astype(np.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    # chroma of each 2x2 block from its mean colour, rounded
    h, w = r.shape
    mean = rgb.reshape(h // 2, 2, w // 2, 2, 3).sum(axis=(1, 3))
    mr, mg, mb = mean[..., 0], mean[..., 1], mean[..., 2]  # 4x the block's mean
    u = ((-38 * mr - 74 * mg + 112 * mb + 512) >> 10) + 128
    v = ((112 * mr - 94 * mg - 18 * mb + 512) >> 10) + 128
    planes = [y.reshape(-1), u.reshape(-1), v.reshape(-1)]
    return np.concatenate(planes).clip(0, 255).astype(np.uint8).reshape(h * 3 // 2, w)


def write_video(path: Path, frames: list[np.ndarray], fps: int) -> None:
    """H.264 MP4 with PyAV, the same bytes on every run of one machine.

    The frames reach x264 already in its pixel format (no swscale, see ``rgb_to_yuv420p``),
    x264 runs one thread with CPU-independent algorithms, and muxing is bit-exact (no
    creation time or library version strings in the container).
    """
    import av  # only the video dataset needs it

    h, w = frames[0].shape[:2]
    with av.open(str(path), mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=fps, options={
            "crf": "20", "preset": "medium",
            "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0:cpu-independent=1"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.thread_count = 1
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        for frame in frames:
            yuv = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")
            for packet in stream.encode(yuv):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def build_video(rng: random.Random, root: Path, n: int, prefix: str) -> list[dict]:
    """2 s clips at 8 fps of a coloured square crossing the frame left-to-right or right-to-left."""
    (root / "videos").mkdir(parents=True)
    records = []
    for i, direction in enumerate(balanced(rng, ["right", "left"], n)):
        w, h = rng.choice(VIDEO_SIZES)
        side = rng.randint(16, 28)
        colour = PALETTE[rng.choice(list(PALETTE))]
        y = rng.randint(2, h - 2 - side)
        start, end = rng.randint(2, 10), w - side - rng.randint(2, 10)
        if direction == "left":
            start, end = end, start
        frames = []
        for t in range(VIDEO_FRAMES):
            x = round(start + (end - start) * t / (VIDEO_FRAMES - 1))
            img = Image.new("RGB", (w, h), BACKGROUND)
            draw_shape(ImageDraw.Draw(img), "square", (x, y, x + side, y + side), colour)
            frames.append(np.asarray(img))
        rel = f"videos/{i:04d}.mp4"
        write_video(root / rel, frames, VIDEO_FPS)
        records.append({"id": f"{prefix}-{i:04d}", "video": rel,
                        "conversations": conv(f"<video>\n{Q_DIRECTION}", direction)})
    return records


@dataclass(frozen=True)
class DemoDataset:
    name: str
    file: str  # annotation file in the output folder; .json = array, .jsonl = one record a line
    build: Callable[[random.Random, Path, int, str], list[dict]]
    count: int
    prefix: str  # record ids and the media subfolder
    rate: dict  # the dictionary's repeat_time or sampling_rate
    extra: dict | None = None  # other dictionary keys (bbox_format)


DATASETS = [
    DemoDataset("demo_shapes", "shapes.json", build_shapes, 200, "shapes", {"repeat_time": 1.0}),
    DemoDataset("demo_shapes_eval", "shapes_eval.json", build_shapes, 40, "shapes_eval", {"repeat_time": 1.0}),
    # repeat_time 3: the colour questions are most of the demo's steps, so the tiny model
    # learns them from the pixels within the demo's time (scripts/demo.sh); 12 held-out
    # records: 4 of each colour, all asked at the end of the demo (qwenvl.tools.demo_answer).
    DemoDataset("demo_colour", "colour.json", build_colour, 192, "colour", {"repeat_time": 3.0}),
    DemoDataset("demo_colour_eval", "colour_eval.json", build_colour, 12, "colour_eval", {"repeat_time": 1.0}),
    DemoDataset("demo_multi_image", "multi_image.jsonl", build_multi_image, 40, "multi", {"repeat_time": 1.0}),
    DemoDataset("demo_grounding", "grounding.jsonl", build_grounding, 40, "grounding", {"repeat_time": 1.0},
                {"bbox_format": "abs_original"}),
    DemoDataset("demo_text", "text.jsonl", build_text, 60, "text", {"sampling_rate": 0.5}),
    DemoDataset("demo_video", "video.json", build_video, 16, "video", {"repeat_time": 2.0}),
]


# ---------------------------------------------------------------- writing

def dump_records(records: list[dict], path: Path) -> None:
    """JSON array with one record a line (.json) or JSON Lines (.jsonl); LF endings."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    text = "[\n" + ",\n".join(lines) + "\n]\n" if path.suffix == ".json" else "".join(line + "\n" for line in lines)
    path.write_bytes(text.encode("utf-8"))


def dictionary_entries(output: Path, dictionary: Path, counts: dict[str, int]) -> dict:
    """Dictionary entries with paths relative to the dictionary's folder, POSIX separators."""
    rel = Path(os.path.relpath(output.resolve(), dictionary.resolve().parent)).as_posix()
    return {d.name: {"annotation_path": f"{rel}/{d.file}", "data_path": rel, **d.rate, "length": counts[d.name],
                     **(d.extra or {})}
            for d in DATASETS}


def readme(seed: int, counts: dict[str, int]) -> str:
    rows = "\n".join(f"| {d.name} | {d.file} | {counts[d.name]} |" for d in DATASETS)
    return (f"{README_MARKER} (seed {seed}); do not edit by hand.\n\n"
            "Regenerate with `python -m qwenvl.tools.make_demo_data` from the repository root.\n"
            "Media paths in the annotation files are relative to this folder.\n\n"
            f"| dataset | annotation file | records |\n|---|---|---|\n{rows}\n")


def generate(output: Path, seed: int = 0, dictionary: Path | None = None, force: bool = False) -> dict:
    """Write every demo dataset to ``output`` (replacing it) and, unless None, the dictionary.

    Returns the dictionary entries.  Refuses to replace a non-empty ``output`` that
    this tool did not write, unless ``force``.
    """
    output = Path(output)
    if output.exists() and not force:
        marker = output / "README.md"
        if any(output.iterdir()) and not (marker.exists() and marker.read_text().startswith(README_MARKER)):
            raise SystemExit(f"{output} exists and was not written by make_demo_data; "
                             "choose another --output or pass --force to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        counts = {}
        for d in DATASETS:
            records = d.build(random.Random(f"{seed}:{d.name}"), tmp, d.count, d.prefix)
            dump_records(records, tmp / d.file)
            counts[d.name] = len(records)
        (tmp / "README.md").write_text(readme(seed, counts))
        # Swap: the old folder is moved aside first, so a failure here loses nothing.
        old = None
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            output.rename(old / output.name)
        tmp.rename(output)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    entries = dictionary_entries(output, dictionary or output.parent / "dataset_dictionary.json", counts)
    if dictionary is not None:
        text = json.dumps(entries, indent=2) + "\n"
        fd, part = tempfile.mkstemp(prefix=f".{dictionary.name}.", dir=dictionary.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(part, dictionary)
    return entries


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("demo_data"), help="folder to (re)write (default: demo_data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dictionary", default=None,
                   help="dataset dictionary to write (default: dataset_dictionary.json next to --output; "
                        "'' to write none)")
    p.add_argument("--force", action="store_true", help="replace --output even if this tool did not write it")
    args = p.parse_args(argv)
    dictionary = args.output.parent / "dataset_dictionary.json" if args.dictionary is None else (
        Path(args.dictionary) if args.dictionary else None)
    entries = generate(args.output, args.seed, dictionary, args.force)
    size = sum(f.stat().st_size for f in args.output.rglob("*") if f.is_file())
    for name, e in entries.items():
        print(f"{name:18s} {e['length']:4d} records  {e['annotation_path']}")
    print(f"wrote {args.output} ({size / 1e6:.2f} MB)" + (f" and {dictionary}" if dictionary else ""))


if __name__ == "__main__":
    main()
