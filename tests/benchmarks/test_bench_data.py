"""The generated benchmark data: its shape, that our loaders read it, and the reference mode's token counts."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from benchmarks import bench_data
from tests.conftest import load_processor


def _records(data):
    return json.loads(data.annotation.read_text())


def test_mix_has_every_kind_and_follows_the_format(tmp_path):
    from qwenvl.data.catalog.formats import to_conversation
    from qwenvl.data.catalog.registry import load_dictionary

    data = bench_data.generate(tmp_path / "mix", samples=60, mode="mix", seed=3, video=True)
    records = _records(data)
    assert len(records) == 60 == sum(data.counts.values())
    assert set(data.counts) == {"image", "multi_image", "text", "video"}
    spec = load_dictionary(str(data.dictionary))[bench_data.DATASET_NAME]  # also checks "length"
    n_images = n_videos = 0
    for i, record in enumerate(records):
        conversation = to_conversation(record, spec, i)  # tag counts equal media counts
        parts = [p for m in conversation.messages for p in m["content"]]
        images = [p["image"] for p in parts if p["type"] == "image"]
        videos = [p["video"] for p in parts if p["type"] == "video"]
        n_images, n_videos = n_images + len(images), n_videos + len(videos)
        assert len(images) in (0, 1, 2, 3, 4) and len(videos) in (0, 1) and not (images and videos)
        for ref in images:
            with Image.open(ref) as im:
                w, h = im.size
            assert 224 <= w <= 1280 and 224 <= h <= 1280 and w * h <= 1280 * 720
        replies = [m for m in conversation.messages if m["role"] == "assistant"]
        assert 1 <= len(replies) <= 2
        for reply in replies:
            assert bench_data.MIN_WORDS <= len(reply["content"][0]["text"].split()) <= bench_data.MAX_WORDS
    assert (n_images, n_videos) == (data.images, data.videos) and data.videos == data.counts["video"]

    import av

    with av.open(str(data.root / "media" / "vid_00000.mp4")) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames >= 16  # 2-4 s at 8 fps


def test_reference_mode_is_single_image_and_seeded(tmp_path):
    a = bench_data.generate(tmp_path / "a", samples=20, mode="reference", seed=7)
    b = bench_data.generate(tmp_path / "b", samples=20, mode="reference", seed=7)
    assert a.annotation.read_text() == b.annotation.read_text()
    assert (a.root / "media" / "img_00005.jpg").read_bytes() == (b.root / "media" / "img_00005.jpg").read_bytes()
    records = _records(a)
    assert a.counts == {"image": 20} and a.images == 20
    assert all(isinstance(r["image"], str) and len(r["conversations"]) == 2 for r in records)
    c = bench_data.generate(tmp_path / "c", samples=20, mode="reference", seed=8)
    assert c.annotation.read_text() != a.annotation.read_text()
    with pytest.raises(ValueError):
        bench_data.generate(tmp_path / "d", samples=2, mode="other")


@pytest.mark.slow
def test_reference_samples_render_to_about_430_tokens(tmp_path, tiny_model_dir):
    """Through our data pipeline at --max_pixels 200704: <= 256 visual tokens, ~430 tokens a sample."""
    from transformers import AutoConfig

    from qwenvl.data.arguments import DataArguments
    from qwenvl.data.dataset import make_supervised_data_module, sample_token_counts

    model_dir = tiny_model_dir("qwen2_5_vl")
    data = bench_data.generate(tmp_path / "ref", samples=32, mode="reference", seed=0)
    args = DataArguments(dataset_use=data.name, dataset_dictionary=str(data.dictionary), max_pixels=200704)
    processor = load_processor(model_dir)
    dataset = make_supervised_data_module(processor, args, AutoConfig.from_pretrained(model_dir))["train_dataset"]
    counts = [sample_token_counts(dataset[i], dataset.renderer) for i in range(len(dataset))]
    assert max(c["visual_tokens"] for c in counts) <= 256
    assert min(c["visual_tokens"] for c in counts) >= 64  # 224 x 224 at least
    mean = sum(c["tokens"] for c in counts) / len(counts)
    assert 360 <= mean <= 500, mean
