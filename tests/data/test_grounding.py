"""Grounding: boxes and points trained in each family's coordinates for the image as resized.

Real tiny checkpoints of every family, real processors and real images: a red
rectangle on white, resized by ``--max_pixels``; the trained box is read back out of
the rendered labels and checked against the pixels the model receives
(``pixel_values`` undone by ``images_as_seen``).
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw
from transformers import AutoConfig

from qwenvl.data.arguments import DataArguments
from qwenvl.data.catalog.formats import Conversation
from qwenvl.data.errors import DataError
from qwenvl.data.preview import images_as_seen
from qwenvl.data.render.grounding import (FAMILY_CONVENTION, Grounding, box_iou, boxes_in, convert_values,
                                          find_coordinates, matched_iou)
from qwenvl.data.render.processor_settings import configure_processor
from qwenvl.data.render.sample import SampleRenderer
from tests.conftest import FAMILIES, load_processor

# The measurement: a 1400x700 image, the object at [700, 350, 840, 490], --max_pixels 200704.
SIZE = (1400, 700)
OBJECT = (700, 350, 840, 490)  # x1, y1, x2, y2 (x2, y2 exclusive)
PIXELS = dict(max_pixels=200704, min_pixels=3136)
RED = (220, 30, 30)


@pytest.fixture(scope="module")
def object_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("grounding") / "object.png"
    image = Image.new("RGB", SIZE, (255, 255, 255))
    ImageDraw.Draw(image).rectangle((OBJECT[0], OBJECT[1], OBJECT[2] - 1, OBJECT[3] - 1), fill=RED)
    image.save(path)
    return str(path)


def renderer_for(model_dir, **pixels) -> SampleRenderer:
    processor, config = load_processor(model_dir), AutoConfig.from_pretrained(model_dir)
    configure_processor(processor, DataArguments(**{**PIXELS, **pixels}))
    return SampleRenderer(processor, config)


def conversation(image, answer: str, bbox_format=None, question: str = "Locate the red box.") -> Conversation:
    return Conversation([
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]}], origin="test record 0",
        bbox_format=bbox_format)


def trained_text(renderer, sample) -> str:
    ids = sample["input_ids"][sample["labels"] != -100]
    return renderer.processor.tokenizer.decode(ids)


def seen_size(renderer, sample) -> tuple[int, int]:
    patch = renderer.processor.image_processor.patch_size
    _, h, w = sample["image_grid_thw"][0].tolist()
    return w * patch, h * patch


def red_mask(image: Image.Image) -> np.ndarray:
    a = np.asarray(image).astype(int)
    return (a[..., 0] > 150) & (a[..., 1] < 110) & (a[..., 2] < 110)


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_box_lands_on_the_object(family, tiny_model_dir, object_image):
    renderer = renderer_for(tiny_model_dir(family))
    answer = json.dumps({"bbox_2d": list(OBJECT), "label": "red box"})
    sample = renderer.render(conversation(object_image, answer, "abs_original"))
    (seen,) = images_as_seen(sample, renderer.processor.image_processor)
    w, h = seen_size(renderer, sample)
    assert seen.size == (w, h) and (w, h) != SIZE  # the processor did resize it
    (box,) = boxes_in(trained_text(renderer, sample))
    pixels = convert_values(box, FAMILY_CONVENTION[family], "abs_resized", SIZE, (w, h))
    x1, y1, x2, y2 = (int(round(v)) for v in pixels)
    red = red_mask(seen)
    inside = red[y1:y2, x1:x2]
    # The box covers the object (resampling blurs one pixel at its edges) and nothing else is red.
    assert inside.mean() > 0.85, (family, box, (w, h))
    assert inside.sum() / red.sum() > 0.9, (family, box, (w, h))
    if family == "qwen2_5_vl":  # absolute pixels of the 616x308 image the model sees (the numbers)
        assert (w, h) == (616, 308) and box == (308, 154, 370, 216)
    else:  # relative to the image on a 0-1000 scale
        assert box == (500, 500, 600, 700)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_declared_format_trains_the_same_text(family, tiny_model_dir, object_image):
    renderer = renderer_for(tiny_model_dir(family))
    plain = renderer.render(conversation(object_image, "nothing to convert"))
    w, h = seen_size(renderer, plain)
    x1, y1, x2, y2 = OBJECT
    given = {
        "abs_original": [x1, y1, x2, y2],
        "abs_resized": [x1 * w / SIZE[0], y1 * h / SIZE[1], x2 * w / SIZE[0], y2 * h / SIZE[1]],
        "rel_1": [x1 / SIZE[0], y1 / SIZE[1], x2 / SIZE[0], y2 / SIZE[1]],
        "rel_1000": [x1 * 1000 / SIZE[0], y1 * 1000 / SIZE[1], x2 * 1000 / SIZE[0], y2 * 1000 / SIZE[1]],
    }
    texts = {}
    for fmt, box in given.items():
        point = [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]
        tokens = f"<|box_start|>({box[0]},{box[1]}),({box[2]},{box[3]})<|box_end|>"
        answer = json.dumps([{"bbox_2d": box, "label": "red box"}, {"point_2d": point, "label": "centre"}])
        # A box in the question is converted too.
        question = f"Is {json.dumps({'bbox_2d': box})} red? Then give it as {tokens}."
        sample = renderer.render(conversation(object_image, answer + " " + tokens, fmt, question))
        texts[fmt] = renderer.processor.tokenizer.decode(sample["input_ids"])
    assert len(set(texts.values())) == 1, texts
    text = texts["abs_original"]
    expected = "[500, 500, 600, 700]" if FAMILY_CONVENTION[family] == "rel_1000" else "[308, 154, 370, 216]"
    assert text.count(expected) == 2 and "1400" not in text and "840" not in text


@pytest.mark.parametrize("family", FAMILIES)
def test_inverse_conversion_returns_the_box_within_a_pixel(family, tiny_model_dir):
    """Round trip: the user's box -> the trained integers -> back (as chat/evaluate report answers).

    The trained numbers are integers of the family's scale, so the way back is exact up
    to half a step of that scale plus the final rounding to whole pixels: within one
    pixel wherever the model's scale is at least as fine as the image (images up to
    1000 pixels for 0-1000 families; not shrunk, for Qwen2.5-VL), and within one step
    of the model's scale otherwise.
    """
    renderer = renderer_for(tiny_model_dir(family), max_pixels=2_000_000)
    grounding = renderer.grounding
    rng = random.Random(0)
    within_a_pixel = 0
    for k in range(300):
        top = 1000 if k % 2 else 3000
        size = (rng.randint(60, top), rng.randint(60, top))
        (seen,) = grounding.resized_sizes([size])
        x1, y1 = rng.randint(0, size[0] - 2), rng.randint(0, size[1] - 2)
        box = [x1, y1, rng.randint(x1 + 1, size[0]), rng.randint(y1 + 1, size[1])]
        c = Conversation([{"role": "user", "content": [{"type": "image", "image": "x"},
                                                       {"type": "text", "text": json.dumps({"bbox_2d": box})}]}],
                         origin="r", bbox_format="abs_original")
        trained = grounding.training_conversation(c, [size], [seen]).messages[0]["content"][1]["text"]
        back = boxes_in(grounding.user_text(trained, "abs_original", size, seen))[0]
        scale = seen if FAMILY_CONVENTION[family] == "abs_resized" else (1000, 1000)
        step = [size[i % 2] / scale[i % 2] for i in range(4)]  # original pixels per trained unit
        error = np.abs(np.subtract(back, box))
        assert (error <= np.multiply(step, 0.5) + 0.5 + 1e-9).all(), (family, size, seen, box, trained, back)
        if max(step) <= 1:
            assert error.max() <= 1.0, (family, size, seen, box, trained, back)
            within_a_pixel += 1
    assert within_a_pixel >= 50  # the one-pixel case is exercised, not only the bound


def test_each_box_converts_against_its_own_image(tiny_model_dir, tmp_path):
    renderer = renderer_for(tiny_model_dir("qwen2_5_vl"), max_pixels=28 * 28 * 16, min_pixels=28 * 28 * 4)
    Image.new("RGB", (1000, 500)).save(tmp_path / "wide.png")
    Image.new("RGB", (300, 600)).save(tmp_path / "tall.png")
    c = Conversation([
        {"role": "user", "content": [
            {"type": "image", "image": str(tmp_path / "wide.png")},
            {"type": "text", "text": '{"bbox_2d": [0, 0, 500, 250]}'},
            {"type": "image", "image": str(tmp_path / "tall.png")},
            {"type": "text", "text": '{"point_2d": [150, 300]}'}]},
        {"role": "assistant", "content": [{"type": "text", "text": '{"bbox_2d": [0, 0, 300, 600]}'}]}],
        origin="r", bbox_format="abs_original")
    sample = renderer.render(c)
    patch = renderer.processor.image_processor.patch_size
    (_, h1, w1), (_, h2, w2) = (r for r in sample["image_grid_thw"].tolist())
    text = renderer.processor.tokenizer.decode(sample["input_ids"])
    assert f"[0, 0, {w1 * patch // 2}, {h1 * patch // 2}]" in text  # half of the first image
    assert f"[{w2 * patch // 2}, {h2 * patch // 2}]" in text  # centre of the second
    assert f"[0, 0, {w2 * patch}, {h2 * patch}]" in text  # the answer follows the second image


def test_boxes_outside_the_image_are_refused(tiny_model_dir, object_image):
    renderer = renderer_for(tiny_model_dir("qwen2_5_vl"))
    # Undeclared: read as Qwen2.5-VL's own (pixels of the 616x308 image), where 700 is off the image.
    with pytest.raises(DataError, match=r"test record 0: the box \[700, 350, 840, 490\] lies outside.*"
                                        r"bbox_format.*fit abs_original"):
        renderer.render(conversation(object_image, json.dumps({"bbox_2d": list(OBJECT)})))
    with pytest.raises(DataError, match="lies outside its image"):
        renderer.render(conversation(object_image, '{"bbox_2d": [0, 0, 1401, 10]}', "abs_original"))
    # Undeclared and on the image: trained as written (the official code's behaviour).
    sample = renderer.render(conversation(object_image, '{"bbox_2d": [308, 154, 370, 216]}'))
    assert "[308, 154, 370, 216]" in trained_text(renderer, sample)


def test_reading_boxes():
    text = 'x {"bbox_2d": [1, 2.5, 3, 4], "label": "a"} <|box_start|>(5,6),(7,8)<|box_end|> {\'point_2d\': [9, 10]}'
    assert [(c.kind, c.values) for c in find_coordinates(text)] == [
        ("box", (1, 2.5, 3, 4)), ("box", (5, 6, 7, 8)), ("point", (9, 10))]
    assert find_coordinates('Answer as {"bbox_2d": [x1, y1, x2, y2]}') == []  # a template, not a box
    for bad in ('{"bbox_2d": [[1, 2, 3, 4]]}', '{"bbox_2d": [1, 2, 3]}', "<|box_start|>(1,2)<|box_end|>"):
        with pytest.raises(DataError, match="rec 3"):
            find_coordinates(bad, "rec 3")


def test_iou_against_hand_computed_values():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert box_iou((0, 0, 10, 10), (0, 0, 5, 10)) == pytest.approx(0.5)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges share no area
    assert box_iou((0, 0, 0, 10), (0, 0, 10, 10)) == 0.0  # no area
    assert box_iou((2, 2, 6, 8), (4, 0, 10, 4)) == pytest.approx(4 / (24 + 24 - 4))
    # Paired in order; a missing prediction scores 0, an extra one is ignored.
    assert matched_iou([(0, 0, 10, 10)], [(0, 0, 10, 10), (0, 0, 5, 5)]) == pytest.approx(0.5)
    assert matched_iou([(0, 0, 10, 10), (1, 1, 2, 2)], [(5, 5, 15, 15)]) == pytest.approx(1 / 7)
    assert matched_iou([(0, 0, 1, 1)], []) is None
    assert boxes_in('[{"bbox_2d": [0, 0, 10, 10]}, {"bbox_2d": [1, 2]}]') == [(0, 0, 10, 10)]  # lenient for answers


def test_qwen3_5_uses_the_relative_1000_convention():
    assert FAMILY_CONVENTION["qwen3_5"] == FAMILY_CONVENTION["qwen3_5_moe"] == FAMILY_CONVENTION["qwen3_vl"] \
        == FAMILY_CONVENTION["qwen2_vl"] == "rel_1000"
    assert FAMILY_CONVENTION["qwen2_5_vl"] == "abs_resized"


def test_unknown_family_with_declared_boxes_is_an_error(tiny_model_dir):
    processor = load_processor(tiny_model_dir("qwen2_5_vl"))
    grounding = Grounding("llava", processor.image_processor)
    c = conversation("x", '{"bbox_2d": [0, 0, 5, 5]}', "abs_original")
    with pytest.raises(DataError, match="no grounding convention is known for model_type 'llava'"):
        grounding.training_conversation(c, [(10, 10)], [(28, 28)])


def test_a_record_may_carry_its_own_bbox_format():
    from qwenvl.data.catalog.formats import to_conversation
    from qwenvl.data.catalog.registry import DatasetSpec

    spec = DatasetSpec("boxes", "/data/boxes.jsonl", bbox_format="rel_1000")
    turns = [{"from": "human", "value": "Where?"}, {"from": "gpt", "value": '{"bbox_2d": [1, 2, 3, 4]}'}]
    assert to_conversation({"conversations": turns}, spec, 0).bbox_format == "rel_1000"
    assert to_conversation({"conversations": turns, "bbox_format": "rel_1"}, spec, 0).bbox_format == "rel_1"
    with pytest.raises(DataError, match=r"record 5: 'bbox_format' must be one of .* got 'pixels'"):
        to_conversation({"conversations": turns, "bbox_format": "pixels"}, spec, 5)
