"""Generated SFT-like data for the training-throughput benchmark, in the LLaVA format.

    python -m benchmarks.bench_data --output /tmp/bench --samples 256 --mode mix [--video]

Two shapes of data:

* ``mix`` (shaped like real SFT data): images from 224x224 to 1280x720 with some
  content (smooth noise plus filled shapes, so JPEG sizes and decode times are
  realistic), answers of 20 to 300 words, and a mix of single-image (55%),
  multi-image (15%, 2-4 images), text-only (20%) and, with ``video=True``, video
  samples (10%, short mp4 clips written with PyAV; without video those are
  single-image).  About a quarter of the samples have a second question and answer.
* ``reference`` (the field's measurement): one image per sample, one question and an
  answer of 20 to 300 words; with ``--max_pixels 200704`` every image gives at most
  256 visual tokens, and a sample averages about 430 tokens.

Written into ``output``: ``media/`` (JPEG images, mp4 clips), ``annotations.json`` (a
JSON array of LLaVA records) and ``dataset_dictionary.json`` registering it under
the name ``bench`` (paths relative to the dictionary).  Everything is seeded: the
same arguments give the same files.  Images are made with numpy and PIL only; 256
samples take a few seconds.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DATASET_NAME = "bench"

# Sizes (width, height) between 224x224 and 1280x720, landscape, square and portrait.
IMAGE_SIZES = ((224, 224), (336, 336), (448, 448), (512, 384), (640, 480), (480, 640),
               (800, 600), (960, 540), (1024, 576), (720, 720), (1280, 720))
MIN_WORDS, MAX_WORDS = 20, 300

# Fractions of the mix (single image, multi-image, text-only, video).
MIX = {"image": 0.55, "multi_image": 0.15, "text": 0.20, "video": 0.10}
SECOND_TURN = 0.25

_WORDS = """the a of and to in is that it for on with as was at by this be from are or an have not
which one all were when there can more if out so what about up into than them some could time
only its other then also new two may first any these way many would like just over such where
image picture shows left right top bottom center corner red green blue yellow orange purple black
white gray bright dark large small round square circle rectangle triangle line edge shape color
background foreground object objects several three four near far above below behind next between
pattern texture noise smooth sharp soft light shadow appears visible clearly partly likely seems
person people street building tree sky water road car table window door wall floor room scene
because however while although therefore each both either every most least much very quite rather
describe detail details region area part whole front back side inside outside around along across
number count total half quarter pair group set row column grid layout arrangement overlapping""".split()

_QUESTIONS = (
    "Describe this image in detail.",
    "What shapes can you see, and where are they?",
    "Write a caption for the picture.",
    "What is the most prominent colour in the image and why does it stand out?",
    "Explain the layout of the objects in this scene.",
    "Is there anything unusual about this picture?",
)
_MULTI_QUESTIONS = ("Compare these images.", "What do the images have in common?",
                    "Describe how the pictures differ from each other.")
_TEXT_QUESTIONS = ("Explain why the sky looks blue during the day.",
                   "Write a short story about a walk in the rain.",
                   "Summarise the advantages of regular exercise.",
                   "Give advice to someone learning to cook.")
_VIDEO_QUESTIONS = ("Describe what happens in this video.", "How do the shapes move in the clip?")
_FOLLOW_UPS = ("Can you say more about that?", "What else do you notice?", "Summarise your answer.")


@dataclass
class BenchData:
    """Where the generated data is, and what it holds."""

    root: Path
    dictionary: Path
    annotation: Path
    name: str = DATASET_NAME
    counts: dict = field(default_factory=dict)  # samples per kind
    images: int = 0
    videos: int = 0
    answer_words: list = field(default_factory=list)  # words per assistant reply


def answer_text(rng: np.random.Generator, n_words: int) -> str:
    """``n_words`` words of English-like text in sentences of 6-18 words."""
    words = rng.choice(_WORDS, size=n_words)
    out, i = [], 0
    while i < n_words:
        k = int(min(rng.integers(6, 19), n_words - i))
        sentence = " ".join(words[i:i + k])
        out.append(sentence[0].upper() + sentence[1:] + ".")
        i += k
    return " ".join(out)


def make_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour noise with a few filled rectangles, ellipses and polygons on top."""
    coarse = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
    fine = rng.normal(0, 12, size=(height, width, 1)).astype(np.int16)
    image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + fine, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = int(rng.integers(0, width - 16)), int(rng.integers(0, height - 16))
        x1 = int(min(width - 1, x0 + rng.integers(16, max(17, width // 2))))
        y1 = int(min(height - 1, y0 + rng.integers(16, max(17, height // 2))))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
    return image


def make_video(path: Path, rng: np.random.Generator, seconds: float = 3.0, fps: int = 8,
               width: int = 448, height: int = 336) -> None:
    """A short mp4 (H.264 when PyAV has it, else MPEG-4) of a square moving over a still background."""
    import av

    background = np.asarray(make_image(rng, width, height))
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    n = int(seconds * fps)
    size = min(width, height) // 4
    colour = rng.integers(0, 256, size=3, dtype=np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(n):
            frame = background.copy()
            x = int((width - size) * k / max(1, n - 1))
            y = int((height - size) * (0.5 + 0.4 * np.sin(k / 3)))
            frame[y:y + size, x:x + size] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _kinds(rng: np.random.Generator, n: int, mode: str, video: bool) -> list[str]:
    if mode == "reference":
        return ["image"] * n
    names = list(MIX)
    p = np.array([MIX[k] for k in names])
    if not video:
        p[names.index("image")] += p[names.index("video")]
        p[names.index("video")] = 0.0
    return [names[i] for i in rng.choice(len(names), size=n, p=p / p.sum())]


def generate(output: str | os.PathLike, samples: int = 256, mode: str = "mix", seed: int = 0,
             video: bool = False) -> BenchData:
    """Write ``samples`` LLaVA records (and their media) into ``output``; see the module docstring."""
    if mode not in ("mix", "reference"):
        raise ValueError(f"mode must be 'mix' or 'reference', not {mode!r}")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    root = Path(output)
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = BenchData(root=root, dictionary=root / "dataset_dictionary.json", annotation=root / "annotations.json")
    records = []

    def new_image() -> str:
        width, height = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
        name = f"media/img_{data.images:05d}.jpg"
        make_image(rng, width, height).save(root / name, quality=90)
        data.images += 1
        return name

    def reply() -> str:
        n = int(rng.integers(MIN_WORDS, MAX_WORDS + 1))
        data.answer_words.append(n)
        return answer_text(rng, n)

    for i, kind in enumerate(_kinds(rng, samples, mode, video)):
        record: dict = {"id": f"bench-{i:05d}"}
        if kind == "image":
            record["image"] = new_image()
            question = "<image>\n" + _QUESTIONS[int(rng.integers(len(_QUESTIONS)))]
        elif kind == "multi_image":
            record["image"] = [new_image() for _ in range(int(rng.integers(2, 5)))]
            question = "\n".join(["<image>"] * len(record["image"])) + "\n" + \
                _MULTI_QUESTIONS[int(rng.integers(len(_MULTI_QUESTIONS)))]
        elif kind == "video":
            name = f"media/vid_{data.videos:05d}.mp4"
            make_video(root / name, rng, seconds=float(rng.uniform(2.0, 4.0)))
            data.videos += 1
            record["video"] = name
            question = "<video>\n" + _VIDEO_QUESTIONS[int(rng.integers(len(_VIDEO_QUESTIONS)))]
        else:
            question = _TEXT_QUESTIONS[int(rng.integers(len(_TEXT_QUESTIONS)))]
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": reply()}]
        if mode == "mix" and rng.random() < SECOND_TURN:
            turns += [{"from": "human", "value": _FOLLOW_UPS[int(rng.integers(len(_FOLLOW_UPS)))]},
                      {"from": "gpt", "value": reply()}]
        record["conversations"] = turns
        records.append(record)
        data.counts[kind] = data.counts.get(kind, 0) + 1

    data.annotation.write_text(json.dumps(records, indent=1))
    data.dictionary.write_text(json.dumps({DATASET_NAME: {
        "annotation_path": data.annotation.name, "data_path": ".", "length": len(records)}}, indent=2))
    return data


def write_dictionary(folder: str | os.PathLike, annotation: str, data_path: str, name: str = "user_data") -> Path:
    """A one-entry dataset_dictionary.json in ``folder`` for a user's own annotation file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dataset_dictionary.json"
    path.write_text(json.dumps({name: {"annotation_path": os.path.abspath(annotation),
                                       "data_path": os.path.abspath(data_path)}}, indent=2))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--mode", choices=("mix", "reference"), default="mix")
    parser.add_argument("--video", action="store_true", help="include video samples in the mix")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = generate(args.output, args.samples, args.mode, args.seed, args.video)
    print(f"wrote {sum(data.counts.values())} samples ({data.counts}), {data.images} images, {data.videos} videos "
          f"to {data.root}; register with --dataset_dictionary {data.dictionary} --dataset_use {data.name}")


if __name__ == "__main__":
    main()
