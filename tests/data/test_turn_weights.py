"""Per-turn training switches (OpenAI's ``"weight": 0``, ms-swift's ``"loss": false``) through the real
processors: the turn is rendered exactly as the template renders it and only its labels change (its
answer, reasoning, tool calls and ``<|im_end|>`` untrained); Qwen3.5/3.6 treat it as history."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoConfig

from qwenvl.data.arguments import DataArguments
from qwenvl.data.batch.count import TokenCounter
from qwenvl.data.catalog.conversation_checks import check_conversation
from qwenvl.data.catalog.formats import Conversation, to_conversation
from qwenvl.data.catalog.registry import DatasetSpec
from qwenvl.data.catalog.sources import open_annotations
from qwenvl.data.dataset import make_supervised_data_module
from qwenvl.data.errors import DataError, DataKind
from qwenvl.data.preview import preview
from qwenvl.data.render.prompt import split_last_reply
from qwenvl.data.render.sample import IGNORE_INDEX, SampleRenderer
from qwenvl.data.skips import Skipped
from tests.conftest import FAMILIES, load_processor

SWITCH_OFF = {"weight": 0, "loss": False}
SWITCH_ON = {"weight": 1, "loss": True}
_CACHE: dict = {}


def _setup(tiny_model_dir, model_type: str, template: str | None = None):
    key = (model_type, template)
    if key not in _CACHE:
        path = tiny_model_dir(model_type, template)
        processor = load_processor(path)
        processor.image_processor.size = {"shortest_edge": 28 * 28, "longest_edge": 56 * 56}
        _CACHE[key] = (processor, AutoConfig.from_pretrained(path))
    return _CACHE[key]


def _spec(path="a.json") -> DatasetSpec:
    return DatasetSpec(name="user", annotation_path=str(path), data_path="")


def _template_messages(conversation: Conversation) -> list[dict]:
    """The conversation as apply_chat_template takes it (inline media, reasoning, tool calls)."""
    out = []
    for m in conversation.messages:
        item = {"role": m["role"], "content": [dict(p) for p in m["content"]]}
        for key in ("reasoning_content", "tool_calls"):
            if key in m:
                item[key] = m[key]
        out.append(item)
    return out


def _template_ids(processor, conversation: Conversation, **kwargs) -> torch.Tensor:
    return processor.apply_chat_template(_template_messages(conversation), tokenize=True, return_dict=True,
                                         return_tensors="pt", **kwargs)["input_ids"][0]


def _trained_runs(labels: torch.Tensor) -> list[tuple[int, int]]:
    """(start, stop) of each stretch of consecutive trained positions."""
    runs, start = [], None
    for i, trained in enumerate((labels != IGNORE_INDEX).tolist() + [False]):
        if trained and start is None:
            start = i
        elif not trained and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _trained_text(sample: dict, tokenizer) -> str:
    return tokenizer.decode(sample["labels"][sample["labels"] != IGNORE_INDEX])


def _three_answers() -> list[dict]:
    return [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "red"},
            {"role": "user", "content": "And the sky?"}, {"role": "assistant", "content": "blue"},
            {"role": "user", "content": "Grass?"}, {"role": "assistant", "content": "green"}]


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("key", ["weight", "loss"])
def test_an_untrained_middle_turn_keeps_its_tokens_and_only_loses_its_labels(tiny_model_dir, tmp_path, model_type,
                                                                            key):
    """Labels of a record whose middle answer is switched off == the labels of the same record with that
    answer's trained stretch (its text and <|im_end|>) masked by hand; the ids are the template's."""
    processor, config = _setup(tiny_model_dir, model_type)
    renderer = SampleRenderer(processor, config)
    image = tmp_path / "red.png"
    Image.new("RGB", (56, 56), (220, 20, 20)).save(image)
    turns = _three_answers()
    switched = [dict(t) for t in turns]
    switched[3][key] = SWITCH_OFF[key]
    switched[5][key] = SWITCH_ON[key]  # an explicit "train it" is the default
    conversation = to_conversation({"images": [str(image)], "messages": switched}, _spec(), 0)
    sample = renderer.render(conversation)
    reference = renderer.render(to_conversation({"images": [str(image)], "messages": turns}, _spec(), 0))

    assert torch.equal(sample["input_ids"], _template_ids(processor, conversation))
    assert torch.equal(sample["input_ids"], reference["input_ids"])
    assert torch.equal(sample["pixel_values"], reference["pixel_values"])
    runs = _trained_runs(reference["labels"])
    assert len(runs) == 3  # one stretch per answer: its text and <|im_end|>
    start, stop = runs[1]
    assert processor.tokenizer.decode(reference["input_ids"][start:stop]) == "blue<|im_end|>"
    masked = reference["labels"].clone()
    masked[start:stop] = IGNORE_INDEX
    assert torch.equal(sample["labels"], masked)
    assert torch.equal(sample["position_ids"], reference["position_ids"])
    assert TokenCounter(processor).count(conversation).tokens == sample["input_ids"].shape[0]


@pytest.mark.parametrize("model_type", ["qwen3_vl", "qwen3_5"])
def test_an_untrained_tool_call_turn_trains_neither_its_text_nor_its_calls(tiny_model_dir, model_type):
    processor, config = _setup(tiny_model_dir, model_type)
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                "parameters": {"type": "object",
                                                               "properties": {"city": {"type": "string"}}}}}
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    record = {"tools": [weather], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [call], "loss": False},
        {"role": "tool", "content": json.dumps({"temperature": 21})},
        {"role": "assistant", "content": "21 degrees."}]}
    conversation = to_conversation(record, _spec(), 0)
    sample = SampleRenderer(processor, config).render(conversation)
    assert torch.equal(sample["input_ids"], _template_ids(processor, conversation, tools=[weather]))
    assert "<tool_call>" in processor.tokenizer.decode(sample["input_ids"])
    assert _trained_text(sample, processor.tokenizer) == "21 degrees.<|im_end|>"
    # The same turn trained: its text and calls are the only difference in the labels.
    record["messages"][1]["loss"] = True
    trained = SampleRenderer(processor, config).render(to_conversation(record, _spec(), 0))
    assert torch.equal(trained["input_ids"], sample["input_ids"])
    extra = trained["labels"][(trained["labels"] != IGNORE_INDEX) & (sample["labels"] == IGNORE_INDEX)]
    assert "Checking." in processor.tokenizer.decode(extra) and "<tool_call>" in processor.tokenizer.decode(extra)


def test_sharegpt_weight_trains_like_the_messages_layout(tiny_model_dir):
    processor, config = _setup(tiny_model_dir, "qwen2_5_vl")
    renderer = SampleRenderer(processor, config)
    sharegpt = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "5", "weight": 0},
                                  {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "4"}]}
    messages = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5", "loss": False},
                             {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "4"}]}
    a = renderer.render(to_conversation(sharegpt, _spec(), 0))
    b = renderer.render(to_conversation(messages, _spec(), 0))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert _trained_text(a, processor.tokenizer) == "4<|im_end|>"


# ----------------------------------------------------------------------------- Qwen3.5 / Qwen3.6 reasoning

def _reasoning_record(first: dict, second: dict) -> dict:
    return {"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "A", **first},
                         {"role": "user", "content": "b?"}, {"role": "assistant", "content": "B", **second}]}


def test_qwen3_5_untrained_reasoning_before_the_last_query_is_history_not_a_split(tiny_model_dir):
    """A trained earlier reasoning turn splits the record (its own sample, reasoning shown); an untrained one is
    context, rendered as the template renders history (reasoning dropped), so the record stays one sample."""
    processor, config = _setup(tiny_model_dir, "qwen3_5")
    renderer = SampleRenderer(processor, config)
    assert "pack" in renderer.render(to_conversation(
        _reasoning_record({"reasoning_content": "r1"}, {"reasoning_content": "r2"}), _spec(), 0))
    conversation = to_conversation(_reasoning_record({"reasoning_content": "r1", "weight": 0},
                                                     {"reasoning_content": "r2"}), _spec(), 0)
    sample = renderer.render(conversation)
    assert "pack" not in sample
    assert torch.equal(sample["input_ids"], _template_ids(processor, conversation))
    assert "r1" not in processor.tokenizer.decode(sample["input_ids"])
    assert _trained_text(sample, processor.tokenizer) == "r2\n</think>\n\nB<|im_end|>"
    assert TokenCounter(processor).count(conversation).tokens == sample["input_ids"].shape[0]


def test_qwen3_5_a_trailing_untrained_turn_adds_no_sample_to_the_split(tiny_model_dir):
    """The turns after the last reasoning cut are all untrained: that part would train nothing, so the record
    trains as its one reasoning sample (ending at that turn), and the counter counts that sample."""
    processor, config = _setup(tiny_model_dir, "qwen3_5")
    renderer = SampleRenderer(processor, config)
    conversation = to_conversation(_reasoning_record({"reasoning_content": "r1"}, {"loss": False}), _spec(), 0)
    sample = renderer.render(conversation)
    assert "pack" not in sample
    prefix = Conversation(conversation.messages[:2], "t")
    assert torch.equal(sample["input_ids"], _template_ids(processor, prefix))
    assert _trained_text(sample, processor.tokenizer) == "r1\n</think>\n\nA<|im_end|>"
    assert TokenCounter(processor).count(conversation).tokens == sample["input_ids"].shape[0]
    # Evaluation asks for the last trained reply, in the mode it trains in: its prompt is the sample's prefix.
    prompt, reference = split_last_reply(conversation)
    assert reference == "A" and renderer.reply_thinking(conversation) == "true"
    ids = renderer.encode(prompt, add_generation_prompt=True, thinking="true")["input_ids"][0]
    assert torch.equal(ids, sample["input_ids"][:ids.shape[0]])


def test_qwen3_5_an_untrained_answer_after_the_last_query_keeps_its_think_block_untrained(tiny_model_dir):
    processor, config = _setup(tiny_model_dir, "qwen3_5")
    conversation = to_conversation(_reasoning_record({}, {"reasoning_content": "r2", "weight": 0}), _spec(), 0)
    sample = SampleRenderer(processor, config).render(conversation)
    assert torch.equal(sample["input_ids"], _template_ids(processor, conversation))
    assert "<think>\nr2\n</think>\n\nB<|im_end|>" in processor.tokenizer.decode(sample["input_ids"])
    assert _trained_text(sample, processor.tokenizer) == "A<|im_end|>"


def test_qwen3_6_untrained_earlier_reasoning_does_not_ask_for_preserve_thinking(tiny_model_dir):
    processor, config = _setup(tiny_model_dir, "qwen3_5", "qwen3_6")
    conversation = to_conversation(_reasoning_record({"reasoning_content": "r1", "loss": False},
                                                     {"reasoning_content": "r2"}), _spec(), 0)
    sample = SampleRenderer(processor, config).render(conversation)
    assert torch.equal(sample["input_ids"], _template_ids(processor, conversation))  # no preserve_thinking
    assert "r1" not in processor.tokenizer.decode(sample["input_ids"])
    assert _trained_text(sample, processor.tokenizer) == "r2\n</think>\n\nB<|im_end|>"


# ----------------------------------------------------------------------------- Hugging Face datasets

@pytest.mark.parametrize("key", ["weight", "loss"])
def test_a_saved_hf_dataset_with_the_switch_column_trains_like_json(tiny_model_dir, tmp_path, key):
    """Arrow gives every message the column (null where a message has none): null is "not given"."""
    import datasets

    processor, config = _setup(tiny_model_dir, "qwen2_5_vl")
    renderer = SampleRenderer(processor, config)
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5", key: SWITCH_OFF[key]},
                {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "4", key: SWITCH_ON[key]}]
    datasets.Dataset.from_list([{"messages": messages}]).save_to_disk(str(tmp_path / "hf"))
    row = open_annotations(str(tmp_path / "hf"))[0]
    assert row["messages"][0][key] is None  # the column Arrow added to the user turn
    sample = renderer.render(to_conversation(row, _spec(tmp_path / "hf"), 0))
    expected = renderer.render(to_conversation({"messages": messages}, _spec(), 0))
    assert torch.equal(sample["input_ids"], expected["input_ids"]) and torch.equal(sample["labels"], expected["labels"])
    assert _trained_text(sample, processor.tokenizer) == "4<|im_end|>"


# ----------------------------------------------------------------------------- checks, training, audit, preview

def test_an_empty_untrained_answer_is_context_not_an_empty_answer(tiny_model_dir):
    """``empty_answer`` refuses a trained turn that would teach only <|im_end|>; an untrained one teaches nothing."""
    processor, config = _setup(tiny_model_dir, "qwen2_5_vl")
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "weight": 0},
                           {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    conversation = to_conversation(record, _spec(), 0)
    check_conversation(conversation)
    sample = SampleRenderer(processor, config).render(conversation)
    assert torch.equal(sample["input_ids"], _template_ids(processor, conversation))
    assert _trained_text(sample, processor.tokenizer) == "4<|im_end|>"
    del record["messages"][1]["weight"]
    with pytest.raises(DataError) as info:
        check_conversation(to_conversation(record, _spec(), 0))
    assert info.value.kind == DataKind.EMPTY_ANSWER


WEIGHTED = [
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "five", "weight": 0},
                  {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "four", "weight": 1}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "five", "loss": False}]},
    {"conversations": [{"from": "human", "value": "3+3?"}, {"from": "gpt", "value": "six", "loss": True}]},
]


def _weighted_dataset(tmp_path) -> str:
    (tmp_path / "w.jsonl").write_text("".join(json.dumps(r) + "\n" for r in WEIGHTED))
    (tmp_path / "dict.json").write_text(json.dumps({"w": {"annotation_path": str(tmp_path / "w.jsonl")}}))
    return str(tmp_path / "dict.json")


def test_training_audit_and_preview_agree_on_switched_off_turns(tiny_model_dir, tmp_path):
    """The record with every answer switched off is skipped (or stops the run) as no_assistant, the audit
    reports it so and counts the others as rendered; the preview marks only trained answers."""
    from qwenvl.tools.audit import AuditArguments, run_audit

    model = str(tiny_model_dir("qwen2_5_vl"))
    processor, config = load_processor(model), AutoConfig.from_pretrained(model)
    dictionary = _weighted_dataset(tmp_path)

    def dataset(policy):
        args = DataArguments(dataset_use="w", dataset_dictionary=dictionary, bad_sample_policy=policy)
        return make_supervised_data_module(processor, args, config, seed=0)["train_dataset"]

    skipping = dataset("skip")
    items = {int(skipping.mixture[i][1]): skipping[i] for i in range(len(skipping))}
    assert isinstance(items[1], Skipped) and skipping.skip_log.counts == {"no_assistant": 1}
    assert _trained_text(items[0], processor.tokenizer) == "four<|im_end|>"
    assert _trained_text(items[2], processor.tokenizer) == "six<|im_end|>"
    with pytest.raises(DataError, match="record 1: every assistant turn is marked untrained"):
        dataset("error")  # the start-up check of the first records finds it before the model loads

    report, status = run_audit(DataArguments(dataset_use="w", dataset_dictionary=dictionary),
                               AuditArguments(model_name_or_path=model, num_workers=0,
                                              report=str(tmp_path / "audit.json")), progress=False)
    assert status == 1
    assert [(p["record"], p["kind"]) for p in report["problems"]] == [(1, "no_assistant")]
    assert report["datasets"]["w"]["tokens"]["max"] == max(len(items[r]["input_ids"]) for r in (0, 2))

    index = [int(r) for _, r in skipping.mixture].index(0)
    text = preview(["--dataset_use", "w", "--dataset_dictionary", dictionary, "--model_name_or_path", model,
                    "--index", str(index), "--bad_sample_policy", "skip"])
    assert "assistant\nfive<|im_end|>" in text and "[[four<|im_end|>]]" in text and "[[five" not in text
    assert f"trained: {int((items[0]['labels'] != IGNORE_INDEX).sum())}" in text
