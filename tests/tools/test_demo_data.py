"""The bundled demo data: reproducible from the generator, well-formed, and right.

Checks run on the committed ``demo_data/`` (what users train on) after one
regeneration into a temporary folder proves it still matches the generator.
Answers are recomputed from the pixels, never from generator internals: the
shapes are found as connected components of non-white pixels, a colour is the
palette entry nearest a component's centre pixel, a shape kind follows from how
much of its bounding box it fills (square ~1, circle ~0.79, triangle ~0.5).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwenvl.tools import make_demo_data as demo

av = pytest.importorskip("av")

REPO = Path(__file__).resolve().parents[2]
DICTIONARY = REPO / "dataset_dictionary.json"
MIN_AREA = 20  # components smaller than this are JPEG specks, not shapes


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """A regeneration with the default seed: <tmp>/demo_data and <tmp>/dataset_dictionary.json."""
    root = tmp_path_factory.mktemp("regen")
    demo.main(["--output", str(root / "demo_data")])
    return root


@pytest.fixture(scope="module")
def dictionary() -> dict:
    assert DICTIONARY.exists(), "dataset_dictionary.json is missing: run python -m qwenvl.tools.make_demo_data"
    return json.loads(DICTIONARY.read_text())


def load_records(path: Path) -> list[dict]:
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def datasets(dictionary) -> dict[str, tuple[Path, list[dict]]]:
    """name -> (media root, records) for every demo dataset, from the committed files."""
    out = {}
    for d in demo.DATASETS:
        entry = dictionary[d.name]
        out[d.name] = (DICTIONARY.parent / entry["data_path"],
                       load_records(DICTIONARY.parent / entry["annotation_path"]))
    return out


def media(record: dict, key: str) -> list[str]:
    value = record.get(key, [])
    return [value] if isinstance(value, str) else list(value)


def answer(record: dict) -> str:
    return record["conversations"][-1]["value"]


def label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected labels (-1 = background) by min-label propagation with pointer jumping."""
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    flat_mask = mask.ravel()
    while True:
        p = np.pad(lab, 1, constant_values=big)
        new = np.minimum.reduce([p[1:-1, 1:-1], p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new = np.where(mask, new, big).ravel()
        for _ in range(4):  # point each pixel at its label's label
            new[flat_mask] = new[new[flat_mask]]
        new = new.reshape(h, w)
        if np.array_equal(new, lab):
            return np.where(mask, lab, -1)
        lab = new


def nearest_colour(rgb) -> str:
    rgb = np.asarray(rgb, dtype=float)
    return min(demo.PALETTE, key=lambda c: float(((np.asarray(demo.PALETTE[c]) - rgb) ** 2).sum()))


def find_shapes(arr: np.ndarray) -> list[dict]:
    """Shapes in an RGB array: bbox (x2, y2 exclusive), colour, kind, fill ratio; top-left first."""
    mask = (255 - arr.astype(int)).max(axis=-1) > 60
    lab = label_components(mask)
    shapes = []
    for value in np.unique(lab[lab >= 0]):
        ys, xs = np.nonzero(lab == value)
        if len(xs) < MIN_AREA:
            continue
        x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        fill = len(xs) / ((x2 - x1) * (y2 - y1))
        cy, cx = int(round(ys.mean())), int(round(xs.mean()))
        kind = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
        shapes.append({"bbox": [x1, y1, x2, y2], "colour": nearest_colour(arr[cy, cx]), "kind": kind,
                       "fill": fill, "centre_x": float(xs.mean())})
    return sorted(shapes, key=lambda s: (s["bbox"][1], s["bbox"][0]))


def image_shapes(root: Path, rel: str) -> list[dict]:
    with Image.open(root / rel) as img:
        return find_shapes(np.asarray(img.convert("RGB")))


def video_frames(path: Path) -> tuple[list[np.ndarray], object]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream.average_rate


# ---------------------------------------------------------------- reproducibility

def test_committed_annotations_match_generator(fresh, dictionary):
    """Guards against the committed data drifting from the generator (or vice versa)."""
    regenerated = json.loads((fresh / "dataset_dictionary.json").read_text())
    for name, entry in regenerated.items():
        assert dictionary.get(name) == entry, f"dictionary entry {name} differs from the generator's"
        assert (fresh / entry["annotation_path"]).read_bytes() == (REPO / entry["annotation_path"]).read_bytes(), (
            f"{entry['annotation_path']} differs from the generator's output: rerun "
            "python -m qwenvl.tools.make_demo_data and commit the result")
    assert (fresh / "demo_data/README.md").read_bytes() == (REPO / "demo_data/README.md").read_bytes()


def _data_files(folder):
    """Files of a demo_data folder, without the caches training writes next to annotations
    (length caches, index sidecars; git-ignored)."""
    caches = re.compile(r"\.lengths\.[0-9a-f]+\.(npy|json)$|\.idx\.npy$")
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and not caches.search(p.name))


def test_committed_media_match_generator(fresh):
    """PNGs decode to the same pixels; JPEGs and MP4s (encoder builds may differ) to nearly the same."""
    new_files = _data_files(fresh / "demo_data")
    old_files = _data_files(REPO / "demo_data")
    assert new_files == old_files, "committed demo_data/ has missing or extra files"
    for rel in new_files:
        a, b = fresh / "demo_data" / rel, REPO / "demo_data" / rel
        if rel.suffix in (".png", ".jpg"):
            pa, pb = (np.asarray(Image.open(p).convert("RGB"), dtype=int) for p in (a, b))
            assert pa.shape == pb.shape, rel
            diff = np.abs(pa - pb)
            assert (diff.max() == 0) if rel.suffix == ".png" else (diff.mean() < 2), rel
        elif rel.suffix == ".mp4":
            fa, fb = video_frames(a)[0], video_frames(b)[0]
            assert len(fa) == len(fb), rel
            assert all(np.abs(x.astype(int) - y).mean() < 2 for x, y in zip(fa, fb)), rel


def test_regeneration_is_byte_identical_and_replaces_stale_files(fresh, tmp_path):
    out = tmp_path / "demo_data"
    demo.generate(out, seed=0, dictionary=tmp_path / "d.json")
    (out / "stale.txt").write_text("left over")
    demo.generate(out, seed=0, dictionary=tmp_path / "d.json")  # re-running is safe and replaces the folder
    assert not (out / "stale.txt").exists()
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(fresh / "demo_data") for p in (fresh / "demo_data").rglob("*") if p.is_file())
    for rel in files:  # same machine, same libraries: every byte, JPEG and MP4 included
        assert (out / rel).read_bytes() == (fresh / "demo_data" / rel).read_bytes(), rel
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_other_seed_gives_other_data(tmp_path):
    entries = demo.generate(tmp_path / "demo_data", seed=1, dictionary=None)
    assert (tmp_path / "demo_data/shapes.json").read_bytes() != (REPO / "demo_data/shapes.json").read_bytes()
    assert entries["demo_shapes"]["annotation_path"] == "demo_data/shapes.json"


def test_refuses_foreign_folder_and_keeps_old_data_on_failure(tmp_path, monkeypatch):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("x")
    with pytest.raises(SystemExit, match="not written by make_demo_data"):
        demo.generate(foreign, dictionary=None)
    assert (foreign / "precious.txt").exists()

    out = tmp_path / "demo_data"
    demo.generate(out, dictionary=None)
    before = (out / "shapes.json").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(demo, "write_video", broken)
    with pytest.raises(OSError, match="disk full"):
        demo.generate(out, dictionary=None)
    assert (out / "shapes.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_data", "mine"]


# ---------------------------------------------------------------- well-formed

def test_dictionary_entries(dictionary, datasets):
    for d in demo.DATASETS:
        entry = dict(dictionary[d.name])
        # The grounding set's boxes are pixels of its image files, which every family resizes.
        assert entry.pop("bbox_format", None) == ("abs_original" if d.name == "demo_grounding" else None), d.name
        assert set(entry) in ({"annotation_path", "data_path", "repeat_time", "length"},
                              {"annotation_path", "data_path", "sampling_rate", "length"}), d.name
        assert not Path(entry["annotation_path"]).is_absolute() and not Path(entry["data_path"]).is_absolute()
        assert entry["length"] == len(datasets[d.name][1]) == d.count, d.name
    assert dictionary["demo_text"]["sampling_rate"] == 0.5
    assert dictionary["demo_shapes"]["repeat_time"] == 1.0


def test_total_size_is_small():
    size = sum(p.stat().st_size for p in (REPO / "demo_data").rglob("*") if p.is_file())
    assert size < 3_000_000, f"demo_data is {size / 1e6:.2f} MB"


def test_records_are_well_formed(datasets):
    ids = set()
    for name, (root, records) in datasets.items():
        for r in records:
            assert r["id"] not in ids, r["id"]
            ids.add(r["id"])
            roles = [t["from"] for t in r["conversations"]]
            if roles[0] == "system":
                roles = roles[1:]
            assert roles and roles == ["human", "gpt"] * (len(roles) // 2), (name, r["id"])
            text = " ".join(t["value"] for t in r["conversations"])
            # one <image> per image and one <video> per video, all in the first human turn
            assert text.count("<image>") == len(media(r, "image")), r["id"]
            assert text.count("<video>") == len(media(r, "video")), r["id"]
            first_human = next(t["value"] for t in r["conversations"] if t["from"] == "human")
            assert first_human.count("<image>") + first_human.count("<video>") == len(media(r, "image")) + len(
                media(r, "video"))


def test_every_image_exists_and_opens(datasets):
    formats, sizes = set(), set()
    for name, (root, records) in datasets.items():
        for r in records:
            for rel in media(r, "image"):
                with Image.open(root / rel) as img:
                    img.load()
                    formats.add(img.format)
                    sizes.add(img.size)
                    w, h = img.size
                    if name == "demo_grounding":  # off the 28/32 grids: every family resizes them
                        off_grid = (w % 28 or h % 28) and (w % 32 or h % 32)
                        assert 90 <= min(w, h) and w * h <= 230 * 170 and off_grid, (rel, img.size)
                    else:
                        assert 56 <= min(w, h) and w * h <= 224 * 168 and w % 28 == 0 and h % 28 == 0, (rel, img.size)
    assert formats == {"PNG", "JPEG"}
    assert len({w / h for w, h in sizes}) >= 3, "several aspect ratios"


def test_every_video_opens_with_expected_frames_and_fps(datasets):
    root, records = datasets["demo_video"]
    for r in records:
        (rel,) = media(r, "video")
        frames, rate = video_frames(root / rel)
        assert len(frames) == demo.VIDEO_FRAMES and rate == demo.VIDEO_FPS, rel
        assert frames[0].shape[:2][::-1] in demo.VIDEO_SIZES


# ---------------------------------------------------------------- answers match the pixels

def test_shapes_answers_match_pixels(datasets):
    for name in ("demo_shapes", "demo_shapes_eval"):
        root, records = datasets[name]
        kinds = {"colour": 0, "shape": 0, "count": 0}
        for r in records:
            question = r["conversations"][0]["value"]
            shapes = image_shapes(root, r["image"])
            if question.endswith(demo.Q_COUNT):
                kinds["count"] += 1
                assert answer(r) == str(len(shapes)), r["id"]
            elif question.endswith(demo.Q_COLOUR):
                kinds["colour"] += 1
                assert len(shapes) == 1 and answer(r) == shapes[0]["colour"], r["id"]
            else:
                assert question == "<image>\n" + demo.Q_SHAPE
                kinds["shape"] += 1
                assert len(shapes) == 1 and answer(r) == shapes[0]["kind"], (r["id"], shapes)
        assert min(kinds.values()) >= len(records) // 3 - 1, kinds


def test_colour_answers_match_pixels_and_are_balanced(datasets):
    """The demo's closing question: one big shape whose colour only the pixels give."""
    for name in ("demo_colour", "demo_colour_eval"):
        root, records = datasets[name]
        for r in records:
            assert r["conversations"][0]["value"] == "<image>\n" + demo.Q_COLOUR, r["id"]
            (shape,) = image_shapes(root, r["image"])
            x1, y1, x2, y2 = shape["bbox"]
            assert min(x2 - x1, y2 - y1) >= 0.7 * demo.COLOUR_SIZE - 2, (r["id"], shape)  # big: most patches see it
            assert answer(r) == shape["colour"], r["id"]
        counts = [sum(answer(r) == c for r in records) for c in demo.COLOUR_NAMES]
        assert max(counts) - min(counts) <= 1, (name, counts)  # no colour is the answer prior
    train = {r["image"] for r in datasets["demo_colour"][1]}
    assert not train & {r["image"] for r in datasets["demo_colour_eval"][1]}


def test_multi_image_answers_match_pixels(datasets):
    root, records = datasets["demo_multi_image"]
    seen = set()
    for r in records:
        first, second = (image_shapes(root, rel) for rel in r["image"])
        seen.add(answer(r))
        if r["conversations"][0]["value"].endswith(demo.Q_MORE):
            assert len(first) != len(second)
            assert answer(r) == ("first" if len(first) > len(second) else "second"), r["id"]
        else:
            assert r["conversations"][0]["value"].endswith(demo.Q_SAME)
            assert len(first) == len(second) == 1
            assert answer(r) == ("yes" if first[0]["colour"] == second[0]["colour"] else "no"), r["id"]
    assert seen == {"first", "second", "yes", "no"}


def test_grounding_boxes_match_pixels(datasets):
    root, records = datasets["demo_grounding"]
    for r in records:
        reply = json.loads(answer(r))
        assert set(reply) == {"bbox_2d", "label"}
        assert r["conversations"][0]["value"] == f"<image>\nLocate the {reply['label']}."
        matches = [s for s in image_shapes(root, r["image"]) if f"{s['colour']} {s['kind']}" == reply["label"]]
        assert len(matches) == 1, (r["id"], reply)
        tolerance = 0 if r["image"].endswith(".png") else 2
        assert np.abs(np.subtract(matches[0]["bbox"], reply["bbox_2d"])).max() <= tolerance, (r["id"], matches)
        with Image.open(root / r["image"]) as img:
            x1, y1, x2, y2 = reply["bbox_2d"]
            assert 0 <= x1 < x2 <= img.width and 0 <= y1 < y2 <= img.height


def test_video_answers_match_motion(datasets):
    root, records = datasets["demo_video"]
    for r in records:
        frames, _ = video_frames(root / r["video"])
        (start,), (end,) = find_shapes(frames[0]), find_shapes(frames[-1])
        moved = end["centre_x"] - start["centre_x"]
        assert abs(moved) > 20, r["id"]
        assert answer(r) == ("right" if moved > 0 else "left"), r["id"]
    assert sorted(answer(r) for r in records).count("left") == len(records) // 2


def test_text_answers_are_right(datasets):
    root, records = datasets["demo_text"]
    turns_seen, systems = set(), 0
    for r in records:
        assert "image" not in r and "video" not in r
        conv = r["conversations"]
        if conv[0]["from"] == "system":
            systems += 1
            conv = conv[1:]
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", conv[0]["value"]).groups()
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert conv[1]["value"] == str(value), r["id"]
        if len(conv) == 4:
            m = re.fullmatch(r"Now (add|multiply that by) (\d+)\.", conv[2]["value"])
            value = value + int(m[2]) if m[1] == "add" else value * int(m[2])
            assert conv[3]["value"] == str(value), r["id"]
        turns_seen.add(len(conv))
    assert turns_seen == {2, 4} and systems >= 2
