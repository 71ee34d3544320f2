"""Qwen3.5 generation in both thinking modes: chat and evaluate ask what training trained.

A tiny Qwen3.5 (the thinking-by-default template of Qwen3.5-4B and larger) is taught two
replies to the same image question: with reasoning (thinking mode: the prompt ends with
``<think>\\n`` and the model writes its reasoning, ``</think>`` and the answer) and without
(non-thinking mode: the prompt holds the empty think block, the model writes the answer).
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from qwenvl.data.render.prompt import split_last_reply, user_conversation
from qwenvl.data.render.sample import IGNORE_INDEX, SampleRenderer
from qwenvl.tools import chat, evaluate
from tests.conftest import load_processor

QUESTION = "What colour is the shape?"
REASONING = "The shape is red."
SIZE = 64  # 4x4 patches of 16 px -> 4 visual tokens


def _conversation(image, reasoning: str | None):
    conversation = user_conversation(QUESTION, [str(image)])
    reply = {"role": "assistant", "content": [{"type": "text", "text": "red"}]}
    if reasoning is not None:
        reply["reasoning_content"] = reasoning
    conversation.messages.append(reply)
    return conversation


def _batch(sample):
    return {"input_ids": sample["input_ids"][None], "labels": sample["labels"][None],
            "position_ids": sample["position_ids"][:, None], "pixel_values": sample["pixel_values"],
            "image_grid_thw": sample["image_grid_thw"]}


@pytest.fixture(scope="module")
def taught(tiny_model_dir, tmp_path_factory):
    """(checkpoint, image): a tiny Qwen3.5 taught both replies, saved like a training output."""
    from qwenvl.train.model import model_class_for

    path = tiny_model_dir("qwen3_5")
    root = tmp_path_factory.mktemp("taught_qwen3_5")
    image = root / "red.png"
    Image.new("RGB", (SIZE, SIZE), (220, 30, 30)).save(image)
    processor = load_processor(path)
    processor.image_processor.size = {"shortest_edge": SIZE * SIZE, "longest_edge": SIZE * SIZE}
    model = model_class_for("qwen3_5").from_pretrained(path)
    renderer = SampleRenderer(processor, model.config)  # --enable_thinking auto: the mode each reply trains in
    batches = [_batch(renderer.render(_conversation(image, r))) for r in (REASONING, None)]
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for step in range(60):
        loss = model(**batches[step % 2]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        losses = [float(model(**b).loss) for b in batches]
    assert max(losses) < 0.05, f"the tiny model did not learn the two replies (losses {losses})"
    out = root / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out, image


def test_each_mode_asks_the_training_prefix(tiny_model_dir, tmp_path):
    """Thinking: the prompt ends with "<think>\\n" and the reasoning is trained; non-thinking: the
    prompt ends with the empty think block and only the answer is trained."""
    image = tmp_path / "red.png"
    Image.new("RGB", (SIZE, SIZE), (220, 30, 30)).save(image)
    processor = load_processor(tiny_model_dir("qwen3_5"))
    from transformers import AutoConfig

    renderer = SampleRenderer(processor, AutoConfig.from_pretrained(tiny_model_dir("qwen3_5")))
    tokenizer = processor.tokenizer
    for reasoning, mode, ending, trained in (
            (REASONING, "true", "<|im_start|>assistant\n<think>\n", REASONING + "\n</think>\n\nred<|im_end|>"),
            (None, "false", "<|im_start|>assistant\n<think>\n\n</think>\n\n", "red<|im_end|>")):
        conversation = _conversation(image, reasoning)
        assert renderer.reply_thinking(conversation) == mode
        sample = renderer.render(conversation)
        prompt, _ = split_last_reply(conversation)
        ids = renderer.encode(prompt, add_generation_prompt=True, thinking=mode)["input_ids"][0]
        n = ids.shape[0]
        assert torch.equal(ids, sample["input_ids"][:n])
        assert tokenizer.decode(ids).endswith(ending)
        assert (sample["labels"][:n] == IGNORE_INDEX).all()
        assert tokenizer.decode(sample["input_ids"][n:][sample["labels"][n:] != IGNORE_INDEX]) == trained


@pytest.mark.slow  # teaches the tiny model first (60 steps)
def test_generation_honours_the_thinking_mode(taught):
    path, image = taught
    model, processor = chat.load_checkpoint(path, device="cpu")
    renderer = chat.make_renderer(model, processor, chat.chat_data_args(processor))
    asked = user_conversation(QUESTION, [str(image)])
    plain = chat.generate(model, processor, renderer, asked, max_new_tokens=8, thinking="false")
    assert plain.text == "red" and plain.stopped_at_end
    thought = chat.generate(model, processor, renderer, asked, max_new_tokens=16, thinking="true")
    assert thought.text == REASONING + "\n</think>\n\nred" and thought.stopped_at_end
    # The command line: --enable_thinking false answers directly; the default is the template's
    # (this one thinks by default), so the model writes its think block.
    common = ["--model", str(path), "--image", str(image), "--prompt", QUESTION, "--max_new_tokens", "16",
              "--device", "cpu"]
    assert chat.main(common + ["--enable_thinking", "false"]) == "red"
    assert chat.main(common) == thought.text


@pytest.mark.slow  # teaches the tiny model first (60 steps)
def test_evaluate_scores_the_answer_without_its_reasoning(taught, tmp_path):
    path, image = taught
    records = [{"image": str(image), "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"},
                                                       {"from": "gpt", "value": answer}]}
               for answer in (f"<think>\n{REASONING}\n</think>\n\nred", "red")]
    (tmp_path / "colours.json").write_text(json.dumps(records))
    dictionary = tmp_path / "dictionary.json"
    dictionary.write_text(json.dumps({"colours": {"annotation_path": "colours.json", "data_path": "."}}))
    results = evaluate.main(["--model", str(path), "--dataset_use", "colours", "--dataset_dictionary",
                             str(dictionary), "--max_new_tokens", "16", "--output", str(tmp_path / "e.json")])
    row = results["datasets"][0]
    assert row["samples"] == 2 and row["exact_count"] == 2, results["predictions"]
    thought, plain = results["predictions"]
    assert (thought["prediction"], thought["reference"], thought["reasoning"]) == ("red", "red", REASONING)
    assert (plain["prediction"], plain["reference"], plain["reasoning"]) == ("red", "red", None)


def test_split_reasoning_rules(tiny_model_dir):
    from qwenvl.data.render.chat_pieces import ChatRules

    q35 = ChatRules.of(load_processor(tiny_model_dir("qwen3_5")))
    q3 = ChatRules.of(load_processor(tiny_model_dir("qwen3_vl")))
    assert evaluate.split_reasoning("r\n</think>\n\nred", q35, True) == ("r", "red")
    assert evaluate.split_reasoning("<think>\nr\n</think>\n\nred", q35, False) == ("r", "red")
    assert evaluate.split_reasoning("still thinking", q35, True) == ("still thinking", "")  # never closed
    assert evaluate.split_reasoning("red", q35, False) == (None, "red")
    # Families without think blocks score the text as written.
    assert evaluate.split_reasoning("r</think>red", q3, False) == (None, "r</think>red")
