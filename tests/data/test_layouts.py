"""Dataset layouts users bring from TRL and LLaMA-Factory, rendered through the real processors.

* TRL conversational prompt-completion (``prompt`` messages, ``completion`` messages,
  ``images``), from ``save_to_disk``, JSON and JSONL: the same sample as the messages
  layout of ``prompt + completion``, the completion trained and nothing else.
* TRL standard prompt-completion (two strings).
* LLaMA-Factory sharegpt: the top-level ``system`` is the system prompt; ``tools``,
  ``function_call`` and ``observation`` render as the family's template renders tools,
  tool calls and tool responses (Qwen3-VL: ids equal ``apply_chat_template(..., tools=)``),
  the calls trained as assistant output; a template without tools refuses them naming
  the record.
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoConfig

from qwenvl.data.catalog.formats import to_conversation
from qwenvl.data.catalog.registry import DatasetSpec
from qwenvl.data.catalog.sources import open_annotations
from qwenvl.data.errors import DataError
from qwenvl.data.render.sample import IGNORE_INDEX, SampleRenderer
from tests.conftest import load_processor


@pytest.fixture(scope="module")
def renderers(tiny_model_dir):
    def make(family):
        path = tiny_model_dir(family)
        processor = load_processor(path)
        processor.image_processor.size = {"shortest_edge": 28 * 28, "longest_edge": 56 * 56}
        return processor, SampleRenderer(processor, AutoConfig.from_pretrained(path))
    return make


def _spec(path, data_path=""):
    return DatasetSpec(name="user", annotation_path=str(path), data_path=str(data_path))


def _trained_text(sample, processor) -> str:
    return processor.tokenizer.decode(sample["input_ids"][sample["labels"] != IGNORE_INDEX])


PROMPT = [{"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
          {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
COMPLETION = [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}]


@pytest.mark.parametrize("storage", ["save_to_disk", "json", "jsonl"])
def test_trl_prompt_completion_trains_like_the_messages_layout(tmp_path, renderers, storage):
    processor, renderer = renderers("qwen2_5_vl")
    image = tmp_path / "red.png"
    Image.new("RGB", (56, 56), (220, 20, 20)).save(image)
    record = {"prompt": PROMPT, "completion": COMPLETION, "images": [str(image)]}
    if storage == "save_to_disk":
        import datasets

        features = None
        rows = {"prompt": [PROMPT], "completion": [COMPLETION], "images": [[Image.open(image)]]}
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "trl"))
        path = tmp_path / "trl"
    elif storage == "json":
        path = tmp_path / "trl.json"
        path.write_text(json.dumps([record]))
    else:
        path = tmp_path / "trl.jsonl"
        path.write_text(json.dumps(record) + "\n")
    spec = _spec(path)
    raw = open_annotations(path)[0]
    sample = renderer.render(to_conversation(raw, spec, 0))

    as_messages = {"messages": PROMPT + COMPLETION, "images": [str(image)]}
    expected = renderer.render(to_conversation(as_messages, spec, 0))
    assert torch.equal(sample["input_ids"], expected["input_ids"])
    assert torch.equal(sample["labels"], expected["labels"])
    assert torch.equal(sample["pixel_values"], expected["pixel_values"])
    assert _trained_text(sample, processor) == "red<|im_end|>"
    text = processor.tokenizer.decode(sample["input_ids"])
    assert text.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>")


def test_trl_standard_prompt_completion_is_one_user_and_one_assistant_turn(renderers):
    processor, renderer = renderers("qwen2_5_vl")
    sample = renderer.render(to_conversation({"prompt": "What is 2 + 3?", "completion": "5"}, _spec("a.json"), 0))
    text = processor.tokenizer.decode(sample["input_ids"])
    assert text.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n")
    assert _trained_text(sample, processor) == "5<|im_end|>"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_5"])
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_trl_prompt_completion_trains_only_the_completion_after_earlier_answers(renderers, family, system):
    """A multi-turn prompt holds earlier assistant answers: context for the completion, as TRL's
    completion mask has it (they were trained, as in the messages layout)."""
    processor, renderer = renderers(family)
    prompt = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
              {"role": "user", "content": "And 3+3?"}]
    record = {"prompt": prompt, "completion": [{"role": "assistant", "content": "6"}]}
    if system:
        record["system"] = system
    sample = renderer.render(to_conversation(record, _spec("a.json"), 0))
    assert _trained_text(sample, processor) == "6<|im_end|>"
    as_messages = renderer.render(to_conversation(
        {"messages": prompt + record["completion"], **({"system": system} if system else {})}, _spec("a.json"), 0))
    assert torch.equal(sample["input_ids"], as_messages["input_ids"])  # the same text, fewer trained tokens
    assert _trained_text(as_messages, processor).endswith("4<|im_end|>6<|im_end|>")
    # The first trained message is the completion's, counted after a top-level system turn too.
    ending_on_answer = {"prompt": prompt[:2], "completion": [{"role": "assistant", "content": "6"}]}
    assert to_conversation(ending_on_answer, _spec("a.json"), 0).trained_from == 2
    assert to_conversation({**ending_on_answer, "system": "s"}, _spec("a.json"), 0).trained_from == 3


@pytest.mark.parametrize("record,expected", [
    ({"prompt": PROMPT}, "a 'prompt' without a 'completion'"),
    ({"prompt": PROMPT, "completion": "red"}, "must both be lists of messages"),
    ({"prompt": PROMPT, "completion": [{"role": "user", "content": "x"}]}, "it must be the assistant's reply"),
])
def test_trl_layout_problems_name_the_record(record, expected):
    with pytest.raises(DataError) as info:
        to_conversation({**record, "images": ["a.png"]}, _spec("/d/trl.json", data_path="/d"), 7)
    assert "file /d/trl.json, record 7" in str(info.value) and expected in str(info.value)


SHAREGPT_SYSTEM = {"system": "You are a shape expert.", "conversations": [
    {"from": "human", "value": "Name a shape."}, {"from": "gpt", "value": "circle"}]}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_sharegpt_system_field_is_the_system_prompt(renderers, family):
    processor, renderer = renderers(family)
    sample = renderer.render(to_conversation(SHAREGPT_SYSTEM, _spec("a.json"), 0))
    expected = processor.apply_chat_template(
        [{"role": "system", "content": [{"type": "text", "text": "You are a shape expert."}]},
         {"role": "user", "content": [{"type": "text", "text": "Name a shape."}]},
         {"role": "assistant", "content": [{"type": "text", "text": "circle"}]}], tokenize=True, return_dict=True)
    assert sample["input_ids"].tolist() == list(expected["input_ids"][0])
    text = processor.tokenizer.decode(sample["input_ids"])
    assert "You are a shape expert." in text and "You are a helpful assistant." not in text


def test_sharegpt_system_and_system_turn_conflict_is_refused():
    record = {"system": "A", "conversations": [{"from": "system", "value": "B"}, *SHAREGPT_SYSTEM["conversations"]]}
    with pytest.raises(DataError, match="both a top-level 'system' and a system turn"):
        to_conversation(record, _spec("a.json"), 3)


WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
SHAREGPT_TOOLS = {
    "system": "You help with the weather.",
    "tools": json.dumps([WEATHER]),
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": json.dumps({"temperature": 21})},
        {"from": "gpt", "value": "It is 21 degrees in Paris."},
    ],
}


def test_sharegpt_tools_render_as_the_qwen3_vl_template_renders_them(renderers):
    processor, renderer = renderers("qwen3_vl")
    sample = renderer.render(to_conversation(SHAREGPT_TOOLS, _spec("a.json"), 0))
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You help with the weather."}]},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": [], "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": [{"type": "text", "text": json.dumps({"temperature": 21})}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is 21 degrees in Paris."}]},
    ]
    tools = [{"type": "function", "function": WEATHER}]
    expected = processor.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True)
    assert sample["input_ids"].tolist() == list(expected["input_ids"][0])
    text = processor.tokenizer.decode(sample["input_ids"])
    assert '"name": "get_weather"' in text.split("<|im_end|>")[0]  # the tool is described in the system turn
    trained = _trained_text(sample, processor)
    # The call is trained as assistant output, the tool's answer (a user-side turn) is not.
    assert trained == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
                       "It is 21 degrees in Paris.<|im_end|>")
    assert "temperature" not in trained


def test_sharegpt_tools_are_refused_where_the_template_has_no_tools(renderers):
    _, renderer = renderers("qwen2_5_vl")
    conversation = to_conversation(SHAREGPT_TOOLS, _spec("/d/tools.json"), 4)
    with pytest.raises(DataError) as info:
        renderer.render(conversation)
    message = str(info.value)
    assert "file /d/tools.json, record 4" in message and "does not render them" in message
    assert "Qwen3-VL" in message


@pytest.mark.parametrize("value,expected", [
    ("not json", "not valid JSON"), (json.dumps({"arguments": {}}), "needs a 'name'")])
def test_bad_function_calls_name_the_turn(value, expected):
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": value}]}
    with pytest.raises(DataError) as info:
        to_conversation(record, _spec("/d/f.json"), 2)
    assert "record 2, turn 1" in str(info.value) and expected in str(info.value)


@pytest.mark.parametrize("value,expected", [
    ("not json", "'tools' is not valid JSON"), (json.dumps([{"description": "no name"}]), "each with a 'name'")])
def test_bad_tools_name_the_record_and_the_fix(value, expected):
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": value}
    with pytest.raises(DataError) as info:
        to_conversation(record, _spec("/d/t.json"), 3)
    assert "file /d/t.json, record 3" in str(info.value) and expected in str(info.value)
    assert "Fix" in str(info.value) or "must be" in str(info.value)
