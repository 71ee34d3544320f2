"""Exact token counts without pixels, and the per-file length cache.

The counts are checked against ``SampleRenderer.render`` itself (input_ids length,
placeholder tokens, pixel rows) for every family, on the demo data (single and
multi-image, grounding, text, video) and on generated samples that the renderer
must shrink or drop for ``--model_max_length``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoConfig

from qwenvl.data.arguments import DataArguments
from qwenvl.data.batch.count import TokenCounter, count_tokens, image_size
from qwenvl.data.batch import length_cache
from qwenvl.data.batch.length_cache import (BAD, TOKENS, VISUAL, _cache_candidates, build_lengths, dataset_lengths,
                                             lengths_for, load_or_build_lengths)
from qwenvl.data.batch.length_key import lengths_key
from qwenvl.data.catalog.formats import to_conversation
from qwenvl.data.catalog.registry import DatasetSpec, load_dictionary
from qwenvl.data.catalog.sources import open_annotations
from qwenvl.data.dataset import make_supervised_data_module
from qwenvl.data.errors import DataError
from qwenvl.data.media.video import video_settings_from
from qwenvl.data.render.fit import SampleTooLong
from qwenvl.data.render.processor_settings import configure_processor
from tests.conftest import load_processor

REPO = Path(__file__).resolve().parents[2]
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
DEMO_PIXELS = dict(max_pixels=112 * 112, min_pixels=56 * 56, video_max_pixels=56 * 56, video_min_pixels=28 * 28,
                   video_max_frames=8, video_min_frames=4)
# A few records of every demo dataset: PNG and JPEG, one and two images, boxes, text, video.
DEMO_MIX = "demo_shapes%1.5,demo_multi_image%8,demo_grounding%8,demo_text%5,demo_video%19"


def rendered_row(sample: dict, tokens) -> tuple[int, int, int]:
    ids = sample["input_ids"]
    visual = int(((ids == tokens.image_pad) | (ids == tokens.video_pad)).sum())
    patches = sum(int(sample[k].shape[0]) for k in ("pixel_values", "pixel_values_videos") if k in sample)
    return int(ids.shape[0]), visual, patches


def _module(model_dir, max_length=None, **kw):
    processor, config = load_processor(model_dir), AutoConfig.from_pretrained(model_dir)
    args = DataArguments(**{**DEMO_PIXELS, "dataset_use": DEMO_MIX, **kw})
    return make_supervised_data_module(processor, args, config, model_max_length=max_length, seed=3), args


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_equal_rendering_on_the_demo_data(family, tiny_model_dir):
    module, _ = _module(tiny_model_dir(family))
    dataset = module["train_dataset"]
    counter = TokenCounter.for_renderer(dataset.renderer)
    kinds = set()
    for i in range(len(dataset)):
        counted = counter(dataset.conversations(i))
        assert counted.row() == rendered_row(dataset[i], counter.tokens), dataset.origin(i)
        assert counted.text_tokens == counted.tokens - counted.visual_tokens
        kinds.add(dataset.entries[int(dataset.mixture[i][0])].spec.name)
    assert kinds == {"demo_shapes", "demo_multi_image", "demo_grounding", "demo_text", "demo_video"}


@pytest.fixture
def big_media(tmp_path):
    """Large images (that must shrink under a small max length), a long text, a frame-list video."""
    Image.new("RGB", (640, 480), (10, 20, 30)).save(tmp_path / "wide.png")
    Image.new("RGB", (300, 900), (200, 20, 30)).save(tmp_path / "tall.jpg")
    Image.new("RGB", (200, 150), (20, 200, 30)).save(tmp_path / "small.png")  # below --max_pixels
    frames = tmp_path / "frames"
    frames.mkdir()
    for k in range(6):
        Image.new("RGB", (96, 64), (k * 40, 0, 0)).save(frames / f"f{k}.png")
    shutil.copy(REPO / "demo_data" / "videos" / "0003.mp4", tmp_path / "clip.mp4")

    def rec(media: dict, prompt: str, answer: str = "ok") -> dict:
        return {**media, "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}
    records = [rec({"image": "wide.png"}, "<image>Describe."),
               rec({"image": ["wide.png", "tall.jpg"]}, "<image><image>" + "Compare them " * 3),
               rec({"image": "small.png"}, "<image>" + "Describe it in detail. " * 6),
               rec({"video": "clip.mp4"}, "<video>" + "What moves? " * 4),
               rec({"video": "frames"}, "<video>Frames."),
               rec({}, "word " * 300)]
    (tmp_path / "big.json").write_text(json.dumps(records))
    (tmp_path / "dict.json").write_text(json.dumps({"big": {"annotation_path": "big.json", "data_path": "."}}))
    return tmp_path


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_counts_follow_the_renderers_shrink_and_drop(family, tiny_model_dir, big_media):
    model = tiny_model_dir(family)
    for max_length in (None, 60):
        module, _ = _module(model, max_length, dataset_use="big", dataset_dictionary=str(big_media / "dict.json"),
                            max_pixels=28 * 28 * 300, min_pixels=28 * 28 * 4, video_max_pixels=28 * 28 * 64,
                            video_min_pixels=28 * 28 * 2)
        dataset = module["train_dataset"]
        counter = TokenCounter.for_renderer(dataset.renderer)
        scaled, dropped = set(), 0
        for i in range(len(dataset)):
            conversation = dataset.conversations(i)
            try:
                rendered = rendered_row(dataset[i], counter.tokens)
            except SampleTooLong:
                with pytest.raises(SampleTooLong):
                    counter(conversation)
                dropped += 1
                continue
            counted = counter(conversation)
            assert counted.row() == rendered, (max_length, dataset.origin(i))
            if counted.scale < 1:
                scaled.add(int(dataset.mixture[i][1]))
        if max_length:
            # The image samples (the one below --max_pixels too) and the mp4 video were
            # re-rendered smaller, and counted so; the long text was dropped by both.
            assert scaled >= {0, 1, 2, 3} and dropped == 1


def test_image_size_reads_headers_only(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    Image.new("RGB", (33, 17)).save(path)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("pixels were decoded"))
    assert image_size(str(path)) == (17, 33)
    assert image_size(Image.new("RGB", (5, 7))) == (7, 5)
    monkeypatch.undo()
    assert image_size(str(path), verify=True) == (17, 33)
    with pytest.raises(DataError) as err:
        image_size(str(tmp_path / "missing.png"), origin="dataset 'x', record 3")
    assert err.value.kind == "missing_media" and "record 3" in str(err.value)
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError) as err:
        image_size(str(tmp_path / "bad.png"))
    assert err.value.kind == "bad_image"


def test_hf_dataset_with_pil_images_counts_like_rendering(tmp_path, tiny_model_dir):
    datasets = pytest.importorskip("datasets")
    rows = {"messages": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]] * 2,
            "images": [[Image.new("RGB", (150, 90), (0, 0, 255))], [Image.new("RGB", (60, 200), (0, 0, 255))]]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "d.json").write_text(json.dumps({"hf": {"annotation_path": "hf"}}))
    module, _ = _module(tiny_model_dir("qwen2_5_vl"), dataset_use="hf", dataset_dictionary=str(tmp_path / "d.json"))
    dataset = module["train_dataset"]
    counter = TokenCounter.for_renderer(dataset.renderer)
    assert [counter(dataset.conversations(i)).row() for i in range(2)] == \
        [rendered_row(dataset[i], counter.tokens) for i in range(2)]


# ------------------------------------------------------------------------ the cache

@pytest.fixture
def demo_copy(tmp_path):
    """The demo annotation files copied into tmp (caches land there), media still in the repo."""
    dictionary = json.loads((REPO / "dataset_dictionary.json").read_text())
    for entry in dictionary.values():
        name = Path(entry["annotation_path"]).name
        shutil.copy(REPO / entry["annotation_path"], tmp_path / name)
        entry["annotation_path"] = name
        entry["data_path"] = str(REPO / "demo_data")
    (tmp_path / "dict.json").write_text(json.dumps(dictionary))
    return tmp_path


def _setup(model_dir, folder, name="demo_grounding", **kw):
    processor = load_processor(model_dir)
    args = DataArguments(**{**DEMO_PIXELS, "dataset_use": name, "dataset_dictionary": str(folder / "dict.json"), **kw})
    spec = load_dictionary(args.dataset_dictionary)[name]
    return processor, args, spec, open_annotations(spec.annotation_path)


def _counter(processor, args, max_length=None) -> TokenCounter:
    configure_processor(processor, args)
    return TokenCounter(processor, video_settings_from(args, processor), max_length)


def test_cache_is_written_next_to_the_file_reused_and_rebuilt_when_stale(tiny_model_dir, demo_copy, monkeypatch):
    processor, args, spec, source = _setup(tiny_model_dir("qwen2_5_vl"), demo_copy)
    rows = load_or_build_lengths(spec, source, processor, args, progress=False)
    assert rows.shape == (len(source), 3) and (rows[:, TOKENS] > 0).all()
    caches = sorted(demo_copy.glob("grounding.jsonl.lengths.*"))
    assert [p.suffix for p in caches] == [".json", ".npy"]
    meta = json.loads(caches[0].read_text())
    assert meta["records"] == len(source) and meta["errors"] == {}

    counted = []
    real_build = build_lengths
    monkeypatch.setattr(length_cache, "build_lengths", lambda *a, **k: counted.append(1) or real_build(*a, **k))
    assert (load_or_build_lengths(spec, source, processor, args, progress=False) == rows).all()
    assert counted == []  # served from the cache

    # Other pixel bounds: another key, built once, next to the first.
    args_small = DataArguments(**{**DEMO_PIXELS, "max_pixels": 56 * 56, "dataset_use": "demo_grounding"})
    small = load_or_build_lengths(spec, source, processor, args_small, progress=False)
    assert counted == [1] and (small[:, VISUAL] < rows[:, VISUAL]).all()
    assert len(list(demo_copy.glob("grounding.jsonl.lengths.*.npy"))) == 2

    # The annotation file changes: the old caches are stale, rebuilt, and removed.
    ann = Path(spec.annotation_path)
    lines = ann.read_text().splitlines()
    ann.write_text("\n".join(lines[:10]) + "\n")
    source = open_annotations(spec.annotation_path)
    fresh = load_or_build_lengths(spec, source, processor, args, progress=False)
    assert counted == [1, 1] and (fresh == rows[:10]).all()
    assert len(list(demo_copy.glob("grounding.jsonl.lengths.*.npy"))) == 1

    # A damaged cache is ignored and rebuilt.
    npy = next(demo_copy.glob("grounding.jsonl.lengths.*.npy"))
    npy.write_bytes(b"garbage")
    assert (load_or_build_lengths(spec, source, processor, args, progress=False) == fresh).all()
    assert counted == [1, 1, 1]


def test_cache_falls_back_to_the_user_cache_when_the_folder_is_not_writable(tiny_model_dir, demo_copy, monkeypatch,
                                                                              tmp_path):
    processor, args, spec, source = _setup(tiny_model_dir("qwen2_5_vl"), demo_copy, "demo_video")
    real = _cache_candidates
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    # The first candidate sits "inside" a regular file: writing there fails as in a read-only folder.
    monkeypatch.setattr(length_cache, "_cache_candidates", lambda ann, key: [blocker / Path(real(ann, key)[0]).name,
                                                                  real(ann, key)[1]])
    rows = load_or_build_lengths(spec, source, processor, args, progress=False)
    saved = list((tmp_path / "xdg_cache" / "qwenvl" / "lengths").glob("*.npy"))
    assert len(saved) == 1 and (np.load(saved[0]) == rows).all()
    assert not list(demo_copy.glob("video.json.lengths.*"))


def test_bad_records_are_marked_with_their_reason(tiny_model_dir, tmp_path):
    Image.new("RGB", (56, 56)).save(tmp_path / "ok.png")
    records = [{"image": "ok.png", "conversations": [{"from": "human", "value": "<image>Hi"},
                                                     {"from": "gpt", "value": "yes"}]},
               {"image": "gone.png", "conversations": [{"from": "human", "value": "<image>Hi"},
                                                       {"from": "gpt", "value": "yes"}]},
               {"conversations": [{"from": "human", "value": "word " * 200}, {"from": "gpt", "value": "x"}]}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "dict.json").write_text(json.dumps({"a": {"annotation_path": "a.jsonl", "data_path": "."}}))
    processor, args, spec, source = _setup(tiny_model_dir("qwen2_5_vl"), tmp_path, "a")
    counter = _counter(processor, args)
    full = lengths_for(spec, source, counter, progress=False)
    assert full.rows[0, 0] > 0 and (full.rows[1] == BAD).all() and full.rows[2, 0] > 200
    assert "gone.png" in full.errors[1] and "record 1" in full.errors[1]
    # Under a max length only the over-long record is recounted: it is dropped, with the reason.
    capped = lengths_for(spec, source, counter.with_max_length(100), progress=False)
    assert (capped.rows[2] == BAD).all() and "--model_max_length 100" in capped.errors[2]
    assert (capped.rows[0] == full.rows[0]).all()


def test_dataset_lengths_follow_the_mixture(tiny_model_dir, demo_copy):
    model = tiny_model_dir("qwen3_vl")
    processor, config = load_processor(model), AutoConfig.from_pretrained(model)
    args = DataArguments(**{**DEMO_PIXELS, "dataset_use": "demo_text%20,demo_video%150,demo_shapes%2",
                            "dataset_dictionary": str(demo_copy / "dict.json")})
    dataset = make_supervised_data_module(processor, args, config, model_max_length=512, seed=1)["train_dataset"]
    rows, bad = dataset_lengths(dataset, num_workers=2, progress=False)
    assert rows.shape == (len(dataset), 3) and bad == {}
    tokens = TokenCounter.for_renderer(dataset.renderer).tokens
    for i in range(0, len(dataset), 3):
        assert tuple(rows[i]) == rendered_row(dataset[i], tokens)
    # Text-only items have no visual tokens; the repeated video items share their record's row.
    text = [i for i in range(len(dataset)) if dataset.entries[int(dataset.mixture[i][0])].spec.name == "demo_text"]
    assert (rows[text, VISUAL] == 0).all()


def test_parallel_build_equals_serial(tiny_model_dir, demo_copy):
    processor, args, spec, source = _setup(tiny_model_dir("qwen2_vl"), demo_copy, "demo_multi_image")
    counter = _counter(processor, args)
    serial = build_lengths(spec, source, counter, num_workers=0, progress=False)
    parallel = build_lengths(spec, source, counter, num_workers=2, chunk=7, progress=False)
    assert (serial.rows == parallel.rows).all() and serial.errors == parallel.errors == {}


def test_count_tokens_needs_video_settings_for_videos(tiny_model_dir):
    from qwenvl.data.catalog.formats import Conversation

    processor = load_processor(tiny_model_dir("qwen2_5_vl"))
    video = str(REPO / "demo_data" / "videos" / "0000.mp4")
    conversation = Conversation([{"role": "user", "content": [{"type": "video", "video": video}]},
                                 {"role": "assistant", "content": [{"type": "text", "text": "left"}]}], "test")
    with pytest.raises(ValueError, match="video settings"):
        count_tokens(conversation, processor)
    missing = Conversation([{"role": "user", "content": [{"type": "video", "video": video + ".nope"}]},
                            {"role": "assistant", "content": [{"type": "text", "text": "left"}]}], "test")
    settings = video_settings_from(DataArguments(), processor)
    with pytest.raises(DataError) as err:
        count_tokens(missing, processor, settings)
    assert err.value.kind == "missing_media"
    assert os.path.basename(video) in str(err.value)


def test_thinking_mode_is_part_of_the_cache_key_and_counts_stay_exact(tiny_model_dir, tmp_path):
    """Qwen3.5: --enable_thinking false drops reasoning and a record with reasoning in an earlier turn
    trains as one sample per turn; the counts follow the renderer, and each mode has its own cache."""
    from qwenvl.data.render.sample import SampleRenderer

    path = tiny_model_dir("qwen3_5")
    processor, config = load_processor(path), AutoConfig.from_pretrained(path)
    records = [{"messages": [{"role": "user", "content": "a?"},
                             {"role": "assistant", "content": "A", "reasoning_content": "first think"},
                             {"role": "user", "content": "b?"},
                             {"role": "assistant", "content": "<think>second</think>B"}]},
               {"messages": [{"role": "user", "content": "c?"}, {"role": "assistant", "content": "C"}]}]
    (tmp_path / "r.json").write_text(json.dumps(records))
    spec = DatasetSpec(name="r", annotation_path=str(tmp_path / "r.json"), data_path=str(tmp_path))
    keys = set()
    for mode, samples in (("auto", 2), ("true", 2), ("false", 1)):
        renderer = SampleRenderer(processor, config, thinking=mode)
        counter = TokenCounter.for_renderer(renderer)
        conversation = to_conversation(records[0], spec, 0)
        item = renderer.render(conversation)
        rendered = item["pack"] if "pack" in item else [item]
        assert len(rendered) == samples, mode
        assert counter(conversation).tokens == sum(s["input_ids"].shape[0] for s in rendered), mode
        keys.add(lengths_key(spec, counter)[0])
    assert len(keys) == 3
