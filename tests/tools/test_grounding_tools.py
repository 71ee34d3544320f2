"""Grounding in the tools: the audit counts boxes and catches those off their image, the dictionary
checks ``bbox_format``, preview draws the trained boxes on the image the model sees, and chat /
evaluate give answers back in the user's coordinates."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from qwenvl.data.arguments import DataArguments
from qwenvl.data.catalog.registry import load_dictionary
from qwenvl.data.errors import DataError
from qwenvl.tools import audit

RED = (220, 30, 30)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))


def _record(image: str, answer: dict | str) -> str:
    value = answer if isinstance(answer, str) else json.dumps(answer)
    return json.dumps({"image": image, "conversations": [{"from": "human", "value": "<image>\nLocate it."},
                                                         {"from": "gpt", "value": value}]})


def write_grounding_dataset(root: Path, bbox_format: str | None, records: list[str]) -> Path:
    """A 300x200 image with a red square at [60, 40, 120, 100], the records, and a dictionary naming them."""
    root.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (300, 200), (255, 255, 255))
    ImageDraw.Draw(image).rectangle((60, 40, 119, 99), fill=RED)
    image.save(root / "square.png")
    (root / "boxes.jsonl").write_text("".join(r + "\n" for r in records))
    entry = {"annotation_path": "boxes.jsonl", "data_path": "."}
    if bbox_format:
        entry["bbox_format"] = bbox_format
    (root / "dict.json").write_text(json.dumps({"boxes": entry}))
    return root / "dict.json"


def run_audit(dictionary: Path, tmp_path: Path, model: str | None = None):
    args = ["--dataset_use", "boxes", "--dataset_dictionary", str(dictionary), "--num_workers", "0",
            "--max_pixels", str(112 * 112), "--min_pixels", str(56 * 56), "--report", str(tmp_path / "r.json")]
    if model:
        args += ["--model_name_or_path", model]
    from transformers import HfArgumentParser

    data_args, audit_args = HfArgumentParser((DataArguments, audit.AuditArguments)).parse_args_into_dataclasses(args)
    return audit.run_audit(data_args, audit_args, progress=False)


def test_audit_counts_boxes_and_catches_one_outside_its_image(tmp_path):
    records = [_record("square.png", {"bbox_2d": [60, 40, 120, 100], "label": "square"}),
               _record("square.png", {"bbox_2d": [260, 40, 320, 100]}),  # past the right edge (300)
               _record("square.png", [{"point_2d": [90, 70]}, {"bbox_2d": [60, 40, 60, 100]}]),  # degenerate box
               _record("square.png", {"bbox_2d": [0.2, 0.2, 0.4, 0.5]})]  # fractions in a pixel dataset
    report, status = run_audit(write_grounding_dataset(tmp_path / "d", "abs_original", records), tmp_path)
    assert status == 1
    assert [(p["record"], p["kind"]) for p in report["problems"]] == [(1, "box_outside_image")]
    assert "[260, 40, 320, 100] lies outside image 1 (300x200" in report["problems"][0]["reason"]
    grounding = report["datasets"]["boxes"]["grounding"]
    assert grounding == {"bbox_format": "abs_original", "records_with_coordinates": 4, "boxes": 4, "points": 1,
                         "outside": 1, "degenerate": 1, "other_convention": 2}
    warnings = {(w["record"], w["kind"]): w["reason"] for w in report["grounding_warnings"]}
    assert set(warnings) == {(1, "other_convention"), (2, "degenerate"), (3, "other_convention")}
    assert "look like rel_1000" in warnings[1, "other_convention"]  # 320 fits the 0-1000 scale, not 300 pixels
    assert "look like rel_1." in warnings[3, "other_convention"]
    assert "[60, 40, 60, 100] has no area" in warnings[2, "degenerate"]
    text = audit.format_report(report)
    assert "boxes: 4 boxes, 1 points in 4 records (bbox_format abs_original), outside their image 1" in text


def test_audit_with_a_model_checks_undeclared_boxes_against_the_resized_image(tmp_path, tiny_model_dir):
    # Undeclared on Qwen2.5-VL: pixels of the image as resized (300x200 -> 112x84 under 112*112 pixels).
    records = [_record("square.png", {"bbox_2d": [22, 17, 45, 42]}),
               _record("square.png", {"bbox_2d": [60, 40, 120, 100]})]  # original pixels: off the 112x84 image
    report, status = run_audit(write_grounding_dataset(tmp_path / "d", None, records), tmp_path,
                               str(tiny_model_dir("qwen2_5_vl")))
    assert status == 1
    (problem,) = report["problems"]
    assert problem["record"] == 1 and problem["kind"] == "box_outside_image"
    assert "undeclared" in problem["reason"] and "seen at 112x84" in problem["reason"]
    assert report["datasets"]["boxes"]["grounding"]["boxes"] == 2
    # Declared as what they are, the same boxes pass, and their token counts are the converted text's.
    fixed = write_grounding_dataset(tmp_path / "e", "abs_original", records[1:])
    report, status = run_audit(fixed, tmp_path, str(tiny_model_dir("qwen2_5_vl")))
    assert status == 0 and not report["problems"]


def test_dictionary_checks_bbox_format(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "dict.json").write_text(json.dumps({"a": {"annotation_path": "a.jsonl", "bbox_format": "abs_orig"}}))
    with pytest.raises(DataError, match=r"'bbox_format' must be one of abs_original, abs_resized, rel_1, rel_1000, "
                                        r"got 'abs_orig'\. Did you mean 'abs_original'\?"):
        load_dictionary(tmp_path / "dict.json")
    (tmp_path / "dict.json").write_text(json.dumps({"a": {"annotation_path": "a.jsonl", "bbox_format": "rel_1"}}))
    assert load_dictionary(tmp_path / "dict.json")["a"].bbox_format == "rel_1"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_preview_draws_the_trained_box_on_the_image_the_model_sees(family, tmp_path, tiny_model_dir):
    from qwenvl.data.preview import preview

    dictionary = write_grounding_dataset(
        tmp_path / "d", "abs_original", [_record("square.png", {"bbox_2d": [60, 40, 120, 100]})])
    out = tmp_path / "drawn"
    text = preview(["--dataset_use", "boxes", "--dataset_dictionary", str(dictionary), "--model_name_or_path",
                    str(tiny_model_dir(family)), "--max_pixels", str(112 * 112), "--min_pixels", str(56 * 56),
                    "--draw_dir", str(out)])
    path = out / "item0_sample0_image0.png"
    assert f"drawn: {path}" in text
    drawn = np.asarray(Image.open(path)).astype(int)
    h, w = drawn.shape[:2]
    assert (w, h) != (300, 200)  # resized (Qwen3-VL, factor 32: to 128x64, a new aspect ratio)
    # The outline is pure red (255, 0, 0) and lies on the square's edges in the resized image.
    outline = (drawn[..., 0] == 255) & (drawn[..., 1] == 0) & (drawn[..., 2] == 0)
    ys, xs = np.nonzero(outline)
    expected = (60 * w / 300, 40 * h / 200, 120 * w / 300 - 1, 100 * h / 200 - 1)
    assert np.abs(np.subtract((xs.min(), ys.min(), xs.max(), ys.max()), expected)).max() <= 1.5, (w, h)
    inner = drawn[ys.min() + 2:ys.max() - 1, xs.min() + 2:xs.max() - 1]
    assert ((inner[..., 0] > 150) & (inner[..., 1] < 110)).mean() > 0.9  # the square is under the box


def test_chat_answer_in_user_coordinates(tiny_model_dir, tmp_path):
    """The reply's boxes go back to the user's format; the prompt's box is converted like training's."""
    from qwenvl.data.render.prompt import user_conversation
    from qwenvl.tools.chat import Reply, chat_data_args, in_user_coordinates, load_checkpoint, make_renderer

    model, processor = load_checkpoint(tiny_model_dir("qwen2_5_vl"), device="cpu")
    renderer = make_renderer(model, processor, chat_data_args(processor, False, max_pixels=112 * 112,
                                                              min_pixels=56 * 56))
    write_grounding_dataset(tmp_path, None, [])
    conversation = user_conversation('What is in {"bbox_2d": [60, 40, 120, 100]}?', [str(tmp_path / "square.png")])
    conversation.bbox_format = "abs_original"
    inputs = renderer.encode(conversation, add_generation_prompt=True)
    prompt = processor.tokenizer.decode(inputs["input_ids"][0])
    assert '{"bbox_2d": [22, 17, 45, 42]}' in prompt  # 300x200 seen at 112x84: 60 * 112 / 300 = 22.4 ...
    reply = Reply('{"bbox_2d": [28, 21, 56, 42]}', [], True, resized=[(112, 84)])
    assert in_user_coordinates(reply.text, renderer, conversation, reply, "abs_original") == \
        '{"bbox_2d": [75, 50, 150, 100]}'  # 28 * 300 / 112 = 75, 21 * 200 / 84 = 50, ...
    assert in_user_coordinates(reply.text, renderer, conversation, reply, "rel_1") == \
        '{"bbox_2d": [0.25, 0.25, 0.5, 0.5]}'
    assert in_user_coordinates(reply.text, renderer, conversation, reply, "rel_1000") == \
        '{"bbox_2d": [250, 250, 500, 500]}'
    assert in_user_coordinates(reply.text, renderer, conversation, reply, None) == reply.text


def test_evaluate_scores_grounding_by_iou(tiny_model_dir, tmp_path):
    """A real (random) tiny model answers; IoU is scored in the dataset's coordinates against the reference."""
    from qwenvl.data.batch.collate import PaddedCollator
    from qwenvl.data.catalog.registry import parse_dataset_use
    from qwenvl.data.dataset import SupervisedDataset
    from qwenvl.tools.chat import chat_data_args, load_checkpoint, make_renderer
    from qwenvl.tools.evaluate import evaluate_dataset, format_table

    dictionary = write_grounding_dataset(tmp_path, "abs_original",
                                         [_record("square.png", {"bbox_2d": [60, 40, 120, 100]})])
    model, processor = load_checkpoint(tiny_model_dir("qwen2_5_vl"), device="cpu")
    renderer = make_renderer(model, processor, chat_data_args(processor, False, max_pixels=112 * 112,
                                                              min_pixels=56 * 56))
    (entry,) = parse_dataset_use("boxes", load_dictionary(dictionary))
    dataset = SupervisedDataset([entry], renderer, seed=0)
    collator = PaddedCollator(processor.tokenizer.pad_token_id)
    score, (prediction,) = evaluate_dataset(model, processor, renderer, collator, dataset, "boxes", max_new_tokens=4,
                                            iou_threshold=0.5)
    # The random model writes no box: IoU 0 for this grounding sample, not "not a grounding sample".
    assert score.grounding == 1 and prediction.iou == 0.0 and score.iou_hits == 0
    row = score.summary()
    assert row["grounding_samples"] == 1 and row["iou"] == 0.0 and row["iou_hit"] == 0.0
    assert "iou@0.5" in format_table([row], 0.5)
