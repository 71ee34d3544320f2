"""The offline packing tool: budgets, fill ratio on the demo mix, a packed file that trains as registered."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig

from qwenvl.data.arguments import DataArguments
from qwenvl.data.catalog.mixture import build_mixture
from qwenvl.data.catalog.registry import load_dictionary, parse_dataset_use
from qwenvl.data.catalog.sources import open_annotations
from qwenvl.data.dataset import make_supervised_data_module
from qwenvl.tools import pack_data
from tests.conftest import copy_demo_annotations, load_processor

REPO = Path(__file__).resolve().parents[2]
DEMO = "demo_shapes,demo_shapes_eval,demo_multi_image,demo_grounding,demo_text,demo_video"
PIXELS = ["--max_pixels", str(112 * 112), "--min_pixels", str(56 * 56), "--video_max_pixels", str(56 * 56),
          "--video_min_pixels", str(28 * 28), "--video_max_frames", "8", "--video_min_frames", "4"]
PIXEL_ARGS = dict(max_pixels=112 * 112, min_pixels=56 * 56, video_max_pixels=56 * 56, video_min_pixels=28 * 28,
                  video_max_frames=8, video_min_frames=4)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))


@pytest.fixture
def demo_copy(tmp_path) -> Path:
    """The demo annotation files and dictionary copied to tmp (media stay in the repo, by absolute data_path)."""
    return copy_demo_annotations(tmp_path / "demo").parent


def _pack(argv: list[str], capsys) -> tuple[int, str]:
    status = pack_data.main(argv)
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_demo_mix_packs_above_95_percent_and_trains_as_registered(demo_copy, tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("qwen2_5_vl")
    out, report = tmp_path / "packed.json", tmp_path / "packed.report.json"
    dictionary = demo_copy / "dict.json"
    status, text = _pack(["--dataset_use", DEMO, "--dataset_dictionary", str(dictionary), "--model_name_or_path",
                          str(model), "--model_max_length", "1024", "--output", str(out), "--report", str(report),
                          "--register_as", "demo_packed", "--num_workers", "2", *PIXELS], capsys)
    assert status == 0, text
    summary = json.loads(report.read_text())
    assert summary["fill_ratio"] >= 0.95 and "fill ratio" in text
    assert summary["dropped_too_long"] == summary["dropped_bad"] == summary["dropped_over_patch_budget"] == 0

    # Every sample of the epoch's mixture is in exactly one pack, with its media made absolute.
    entries = parse_dataset_use(DEMO, load_dictionary(dictionary))
    sources = [open_annotations(e.spec.annotation_path) for e in entries]
    mixture = build_mixture(entries, [len(s) for s in sources], 42)
    packed = json.loads(out.read_text())
    assert len(packed) == summary["packs"]
    wanted = sorted(json.dumps(sources[d][r], sort_keys=True) for d, r in mixture.tolist())
    got = [record for pack in packed for record in pack]
    for record in got:
        for key in ("image", "video"):
            for ref in np.atleast_1d(record.get(key, [])):
                assert Path(ref).is_absolute() and Path(ref).exists()
    # Records of a dataset with a bbox_format carry it: the packed file trains their boxes the same way.
    assert {r.get("bbox_format") for r in got if r["id"].startswith("grounding")} == {"abs_original"}
    assert not any("bbox_format" in r for r in got if not r["id"].startswith("grounding"))
    strip = [{k: v for k, v in r.items() if k not in ("image", "video", "bbox_format")} for r in got]
    assert sorted(json.dumps(r, sort_keys=True) for r in strip) == sorted(
        json.dumps({k: v for k, v in json.loads(w).items() if k not in ("image", "video")}, sort_keys=True)
        for w in wanted)

    # Registered in the dictionary; --data_packing trains on it: a pack renders within the budget.
    assert load_dictionary(dictionary)["demo_packed"].data_path == ""
    args = DataArguments(dataset_use="demo_packed", dataset_dictionary=str(dictionary), data_packing=True,
                         **PIXEL_ARGS)
    module = make_supervised_data_module(load_processor(model), args, AutoConfig.from_pretrained(model),
                                         model_max_length=1024, seed=0)
    dataset = module["train_dataset"]
    assert len(dataset) == len(packed)
    for i in (0, len(dataset) // 2):
        batch = module["data_collator"]([dataset[i]])
        assert batch["input_ids"].shape[1] <= 1024
        assert int((batch["position_ids"][0, 0] == 0).sum()) == len(packed[i])


def test_patch_budget_and_too_long_samples(tmp_path, tiny_model_dir, capsys, caplog):
    root = tmp_path / "d"
    root.mkdir()
    # 16, 64 and 36 patches of 14 x 14 pixels (4, 16 and 9 visual tokens).
    for k, size in enumerate([(56, 56), (112, 112), (84, 84)]):
        Image.new("RGB", size, (k * 80, 0, 0)).save(root / f"{k}.png")

    def rec(image, prompt="<image>\nWhat colour?", answer="red"):
        record = {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}
        if image is not None:
            record["image"] = image
        return record
    records = [rec(f"{k % 3}.png") for k in range(30)] + [rec(None, "long " * 400)]
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "dict.json").write_text(json.dumps({"a": {"annotation_path": "a.jsonl", "data_path": "."}}))
    model = tiny_model_dir("qwen2_vl")
    out, report = tmp_path / "p.json", tmp_path / "r.json"
    status, text = _pack(["--dataset_use", "a", "--dataset_dictionary", str(root / "dict.json"),
                          "--model_name_or_path", str(model), "--model_max_length", "256", "--max_pixels",
                          str(112 * 112), "--min_pixels", str(28 * 28), "--max_patches_per_pack", "100",
                          "--output", str(out), "--report", str(report), "--num_workers", "1"], capsys)
    assert status == 0, text
    summary = json.loads(report.read_text())
    # The long text is dropped as too long (never split); every image fits 100 patches.
    assert summary["dropped_too_long"] == 1 and summary["items"] == 30
    packs = json.loads(out.read_text())
    assert sum(len(p) for p in packs) == 30

    # A patch budget below one 112 x 112 image (64 patches) drops those samples, counted.
    status, text = _pack(["--dataset_use", "a", "--dataset_dictionary", str(root / "dict.json"),
                          "--model_name_or_path", str(model), "--model_max_length", "256", "--max_pixels",
                          str(112 * 112), "--min_pixels", str(28 * 28), "--max_patches_per_pack", "40",
                          "--output", str(out), "--report", str(report), "--num_workers", "1"], capsys)
    summary = json.loads(report.read_text())
    assert status == 0 and summary["dropped_over_patch_budget"] == 10 and summary["items"] == 20
    assert "10 over the patch budget" in text
    args = DataArguments(dataset_use="p", dataset_dictionary=str(_register(tmp_path, out)), data_packing=True,
                         max_pixels=112 * 112, min_pixels=28 * 28)
    module = make_supervised_data_module(load_processor(model), args, AutoConfig.from_pretrained(model),
                                         model_max_length=256, seed=0)
    for i in range(len(module["train_dataset"])):
        batch = module["data_collator"]([module["train_dataset"][i]])
        assert batch["pixel_values"].shape[0] <= 40 and batch["input_ids"].shape[1] <= 256

    # The same packed file in padded batches: each sample of a pack is a row of its own, and the run says
    # so, naming the flag that trains packs as rows.
    args.data_packing = False
    with caplog.at_level(logging.WARNING, logger="qwenvl.data.dataset"):
        module = make_supervised_data_module(load_processor(model), args, AutoConfig.from_pretrained(model),
                                             model_max_length=256, seed=0)
    assert "dataset 'p'" in caplog.text and "Fix: add --data_packing True" in caplog.text
    batch = module["data_collator"]([module["train_dataset"][0]])
    assert batch["input_ids"].shape[0] == len(json.loads(out.read_text())[int(module["train_dataset"].mixture[0][1])])


def _register(tmp_path: Path, packed: Path) -> Path:
    path = tmp_path / "packed_dict.json"
    path.write_text(json.dumps({"p": {"annotation_path": str(packed), "data_path": ""}}))
    return path


def test_bad_samples_follow_the_policy(tmp_path, tiny_model_dir, capsys):
    root = tmp_path / "d"
    root.mkdir()
    Image.new("RGB", (56, 56)).save(root / "ok.png")
    good = {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>Hi"},
                                                 {"from": "gpt", "value": "yes"}]}
    missing = {**good, "image": "gone.png"}
    (root / "a.json").write_text(json.dumps([good, missing, good]))
    (root / "dict.json").write_text(json.dumps({"a": {"annotation_path": "a.json", "data_path": "."}}))
    argv = ["--dataset_use", "a", "--dataset_dictionary", str(root / "dict.json"), "--model_name_or_path",
            str(tiny_model_dir("qwen2_5_vl")), "--model_max_length", "512", "--output", str(tmp_path / "p.json"),
            "--report", str(tmp_path / "r.json"), "--num_workers", "1"]
    status, text = _pack(argv, capsys)
    assert status == 1 and "gone.png" in text and "record 1" in text and not (tmp_path / "p.json").exists()
    status, text = _pack(argv + ["--bad_sample_policy", "skip"], capsys)
    summary = json.loads((tmp_path / "r.json").read_text())
    assert status == 0 and summary["dropped_bad"] == 1 and summary["items"] == 2


def test_absolute_media_covers_every_reference_style(tmp_path):
    record = {"image": ["a.png", "/abs/b.png", "s3://bucket/c.png"], "video": [["f1.jpg", "f2.jpg"]],
              "messages": [{"role": "user", "content": [{"type": "image", "image": "d.png"},
                                                        {"type": "image_url", "image_url": {"url": "e.png"}},
                                                        {"type": "text", "text": "hi"}]},
                           {"role": "assistant", "content": "ok"}]}
    out = pack_data.absolute_media(record, str(tmp_path))
    assert out["image"] == [str(tmp_path / "a.png"), "/abs/b.png", "s3://bucket/c.png"]
    assert out["video"] == [[str(tmp_path / "f1.jpg"), str(tmp_path / "f2.jpg")]]
    parts = out["messages"][0]["content"]
    assert parts[0]["image"] == str(tmp_path / "d.png") and parts[1]["image_url"]["url"] == str(tmp_path / "e.png")
    assert out["messages"][1] == record["messages"][1] and record["image"][0] == "a.png"  # input untouched
    remote = pack_data.absolute_media({"image": "x.png"}, "s3://bucket/imgs")
    assert remote["image"] == "s3://bucket/imgs/x.png"


# -- Qwen3.5 / Qwen3.6: its tokenizer and thinking template, Gated DeltaNet layers ---------------------------------

# Reasoning records: the Qwen3.5 template drops the reasoning of a turn before the last user query, so the first
# record trains as two samples (one per reasoning turn, chat_pieces.split_for_thinking) that a pack carries together.
REASONING = [
    {"id": "reason-0000", "messages": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."},
        {"role": "user", "content": "And times 3?"},
        {"role": "assistant", "content": "12", "reasoning_content": "Four threes are twelve."}]},
    {"id": "reason-0001", "messages": [
        {"role": "user", "content": "Is 7 prime?"},
        {"role": "assistant", "content": "<think>\nNo divisor between 2 and 6.\n</think>\n\nYes."}]},
]
QWEN3_5_MIX = "demo_shapes%5,demo_multi_image%10,demo_grounding%10,demo_text%10,demo_video%25,reasoning"


def _sample_losses(model, collator, samples) -> list[tuple[float, int]]:
    """(mean loss, trained tokens) of each sample in a batch of its own."""
    out = []
    for sample in samples:
        batch = collator([sample])
        trained = int((batch["labels"][:, 1:] != -100).sum())  # the model shifts: the first label predicts nothing
        out.append((float(model(**batch).loss), trained))
    return out


def _pack_qwen3_5(model_type, demo_copy, tiny_model_dir, tmp_path, capsys) -> dict:
    """Pack QWEN3_5_MIX offline for a tiny ``model_type`` (registered as ``q35_packed``) and check each pack's
    row against its samples rendered alone from the original datasets; returns what the tests go on with."""
    model_dir = tiny_model_dir(model_type)
    dictionary = demo_copy / "dict.json"
    (demo_copy / "reasoning.json").write_text(json.dumps(REASONING))
    entries = json.loads(dictionary.read_text())
    dictionary.write_text(json.dumps({**entries, "reasoning": {"annotation_path": "reasoning.json",
                                                               "data_path": ""}}))
    out, report = tmp_path / "packed.json", tmp_path / "packed.report.json"
    status, text = _pack(["--dataset_use", QWEN3_5_MIX, "--dataset_dictionary", str(dictionary),
                          "--model_name_or_path", str(model_dir), "--model_max_length", "512", "--output", str(out),
                          "--report", str(report), "--register_as", "q35_packed", "--num_workers", "2", *PIXELS],
                         capsys)
    assert status == 0, text
    summary = json.loads(report.read_text())
    assert summary["dropped_too_long"] == summary["dropped_bad"] == summary["dropped_over_patch_budget"] == 0
    assert summary["packs"] >= 3 and summary["fill_ratio"] >= 0.75
    packed = json.loads(out.read_text())

    processor, config = load_processor(model_dir), AutoConfig.from_pretrained(model_dir)
    packed_module = make_supervised_data_module(
        processor, DataArguments(dataset_use="q35_packed", dataset_dictionary=str(dictionary), data_packing=True,
                                 **PIXEL_ARGS), config, model_max_length=512, seed=0)
    plain = make_supervised_data_module(  # the original datasets, rendered one record at a time
        load_processor(model_dir), DataArguments(dataset_use=QWEN3_5_MIX, dataset_dictionary=str(dictionary),
                                                 **PIXEL_ARGS), config, model_max_length=512, seed=42)
    originals = plain["train_dataset"]  # pack_data's mixture: the same seed (42)
    assert sorted(r["id"] for pack in packed for r in pack) == sorted(
        originals.sources[d][r]["id"] for d, r in originals.mixture.tolist())  # each sample in exactly one pack
    index_of = {originals.sources[d][r]["id"]: i for i, (d, r) in enumerate(originals.mixture.tolist())}

    dataset = packed_module["train_dataset"]
    think = processor.tokenizer.convert_tokens_to_ids("<think>")
    rows, pieces_of, ids_of = [], [], []
    for i in range(len(dataset)):
        records = packed[int(dataset.mixture[i][1])]
        alone = [originals[index_of[r["id"]]] for r in records]
        pieces = [s for item in alone for s in (item["pack"] if "pack" in item else [item])]
        batch = packed_module["data_collator"]([dataset[i]])
        assert batch["input_ids"].shape[1] <= 512
        torch.testing.assert_close(batch["input_ids"][0], torch.cat([s["input_ids"] for s in pieces]))
        torch.testing.assert_close(batch["labels"][0], torch.cat([s["labels"] for s in pieces]))
        # Text positions restart at each sample, the split reasoning record's two samples included.
        assert int((batch["position_ids"][0, 0] == 0).sum()) == len(pieces)
        rows.append(batch)
        pieces_of.append(pieces)
        ids_of.append([r["id"] for r in records])
    # The counts pack_data packed by are the rendered lengths (think blocks, the 3.5 processor's video timestamps).
    assert sum(int(b["input_ids"].shape[1]) for b in rows) == summary["tokens_used"]
    assert sum(len(p) for p in pieces_of) == summary["items"] + 1  # reason-0000 trains as two samples
    assert any("pixel_values_videos" in b for b in rows) and any("pixel_values" in b for b in rows)
    assert any(int((b["input_ids"] == think).sum()) for b in rows)
    return {"model_dir": model_dir, "dictionary": dictionary, "summary": summary, "rows": rows, "pieces": pieces_of,
            "ids": ids_of, "collate_padded": plain["data_collator"]}


@pytest.mark.slow
def test_qwen3_5_offline_packs_are_their_samples_rendered_alone(demo_copy, tiny_model_dir, tmp_path, capsys):
    """Offline packs on Qwen3.5 (its tokenizer, thinking template and video processor): every pack's row is
    its samples, rendered alone from the original datasets, side by side, and its length what was counted."""
    packs = _pack_qwen3_5("qwen3_5", demo_copy, tiny_model_dir, tmp_path, capsys)
    assert any("reason-0000" in ids for ids in packs["ids"])



def test_qwen3_5_record_split_per_reasoning_turn_over_the_budget_is_reported_as_such(tmp_path, tiny_model_dir,
                                                                                       capsys):
    """A record trained as two samples (reasoning in two turns) whose samples fit --model_max_length each but
    not together is dropped (a pack holds a record whole), counted over the token budget, not the patch budget
    (there is none), with its location and the fix."""
    from qwenvl.data.batch.count import TokenCounter
    from qwenvl.data.catalog.formats import to_conversation
    from qwenvl.data.catalog.registry import DatasetSpec
    from qwenvl.data.render.processor_settings import configure_processor

    model_dir = tiny_model_dir("qwen3_5")
    words = " ".join(f"w{k}" for k in range(120))
    two_turns = {"messages": [{"role": "user", "content": f"first {words}"},
                              {"role": "assistant", "content": "a", "reasoning_content": "r"},
                              {"role": "user", "content": f"second {words}"},
                              {"role": "assistant", "content": "b", "reasoning_content": "s"}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "a.json").write_text(json.dumps([short, two_turns, short]))
    (tmp_path / "dict.json").write_text(json.dumps({"a": {"annotation_path": "a.json", "data_path": "."}}))
    # The budget: between the longer of its two samples and their sum, from the counter itself.
    counter = TokenCounter(configure_processor(load_processor(model_dir), DataArguments()))
    conversation = to_conversation(two_turns, DatasetSpec(name="a", annotation_path="a.json", data_path="."), 1)
    parts = [counter(part).tokens for part in counter.chat.split(conversation)]
    assert len(parts) == 2
    budget = (max(parts) + sum(parts)) // 2
    report = tmp_path / "r.json"
    status, text = _pack(["--dataset_use", "a", "--dataset_dictionary", str(tmp_path / "dict.json"),
                          "--model_name_or_path", str(model_dir), "--model_max_length", str(budget), "--output",
                          str(tmp_path / "p.json"), "--report", str(report), "--num_workers", "1"], capsys)
    assert status == 0, text
    summary = json.loads(report.read_text())
    assert summary["items"] == 2 and summary["dropped_over_token_budget"] == 1
    assert summary["dropped_over_patch_budget"] == summary["dropped_too_long"] == 0
    assert summary["dropped"]["over_token_budget"] == [f"dataset 'a', file {tmp_path / 'a.json'}, record 1: "
                                                       f"{sum(parts)} tokens"]
    assert "0 over the patch budget" in text and "1 more dropped over the token budget" in text
    assert "Fix: raise --model_max_length" in text


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen3_5_moe"])
def test_qwen3_5_pack_loss_is_the_token_weighted_loss_of_its_samples(demo_copy, tiny_model_dir, tmp_path, capsys,
                                                                     model_type):
    """The training model (boundary-aware Gated DeltaNet layers, float32) on each offline pack: its loss equals
    the token-weighted mean of its samples' losses, each sample alone in a padded batch (the released forward).
    The released layers on the same rows leak state from sample to sample, and the loss moves."""
    from transformers import AutoModelForImageTextToText

    from qwenvl.train.arguments import parse_args
    from qwenvl.train.linear_attention import linear_attention_modules
    from qwenvl.train.model import load_model

    packs = _pack_qwen3_5(model_type, demo_copy, tiny_model_dir, tmp_path, capsys)
    args = parse_args(["--model_name_or_path", str(packs["model_dir"]), "--output_dir", str(tmp_path / "out"),
                       "--tune_mm_llm", "True", "--router_aux_loss_coef", "0"])
    model = load_model(args.model, args.training)
    released = AutoModelForImageTextToText.from_pretrained(packs["model_dir"], dtype=torch.float32).train()
    assert model.dtype == torch.float32 and len(linear_attention_modules(model)) == 3
    for row, pieces in zip(packs["rows"], packs["pieces"]):
        with torch.no_grad():
            pack_loss = float(model(**row).loss)
            leaky = float(released(**row).loss)
            alone = _sample_losses(model, packs["collate_padded"], pieces)
        weighted = sum(loss * n for loss, n in alone) / sum(n for _, n in alone)
        # Observed: |pack - weighted| <= 1.1e-6, |leaky - weighted| >= 3e-5 (losses ~12.4).
        assert abs(pack_loss - weighted) < 3e-6, (pack_loss, weighted)
        assert abs(leaky - weighted) > 1e-5, (leaky, weighted)


@pytest.mark.slow
def test_qwen3_5_packed_file_trains_with_data_packing(demo_copy, tiny_model_dir, tmp_path, capsys):
    """train_qwen.py on the registered packed file (--data_packing True, one pack per micro-batch) learns."""
    from qwenvl.train.train_qwen import train

    packs = _pack_qwen3_5("qwen3_5", demo_copy, tiny_model_dir, tmp_path, capsys)
    out = tmp_path / "run"
    train(["--model_name_or_path", str(packs["model_dir"]), "--output_dir", str(out), "--dataset_use", "q35_packed",
           "--dataset_dictionary", str(packs["dictionary"]), "--data_packing", "True", "--model_max_length", "512",
           "--per_device_train_batch_size", "1", "--tune_mm_llm", "True", "--tune_mm_mlp", "True",
           "--num_train_epochs", "3", "--learning_rate", "3e-3", "--lr_scheduler_type", "constant",
           "--logging_steps", "1", *PIXELS, "--save_strategy", "no", "--report_to", "none",
           "--dataloader_num_workers", "0", "--seed", "1"])
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 3 * len(packs["rows"])  # one step per pack
    assert sum(losses[-3:]) < sum(losses[:3]) - 1.0  # it learns
