"""Tools through the piece renderer: the template writes the tools block, the calls and the
tool responses; the pieces still join to ``apply_chat_template(..., tools=)``, the calls are
trained with their assistant turn and the responses are not (Qwen3-VL and Qwen3.5 templates)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoProcessor

from qwenvl.data.batch.count import TokenCounter
from qwenvl.data.catalog.formats import Conversation
from qwenvl.data.render.sample import IGNORE_INDEX, SampleRenderer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def _text(t: str) -> list[dict]:
    return [{"type": "text", "text": t}]


def _messages() -> list[dict]:
    return [{"role": "system", "content": _text("You help with the weather.")},
            {"role": "user", "content": _text("Weather in Paris and Rome?")},
            {"role": "assistant", "content": _text("Checking."), "tool_calls": [CALL, CALL]},
            {"role": "tool", "content": _text(json.dumps({"temperature": 21}))},
            {"role": "tool", "content": _text(json.dumps({"temperature": 25}))},
            {"role": "assistant", "content": _text("21 and 25 degrees.")}]


@pytest.mark.parametrize("model_type", ["qwen3_vl", "qwen3_5"])
def test_tool_turns_render_as_the_template_with_calls_trained_and_responses_not(tiny_model_dir, model_type):
    path = tiny_model_dir(model_type)
    processor, config = AutoProcessor.from_pretrained(path), AutoConfig.from_pretrained(path)
    conversation = Conversation(messages=_messages(), origin="test", tools=[WEATHER])
    sample = SampleRenderer(processor, config).render(conversation)
    expected = processor.apply_chat_template(_messages(), tools=[WEATHER], tokenize=True, return_dict=True,
                                             return_tensors="pt")
    assert torch.equal(sample["input_ids"], expected["input_ids"][0])
    trained = processor.tokenizer.decode(sample["labels"][sample["labels"] != IGNORE_INDEX])
    assert trained.count("<tool_call>") == 2 and "Checking." in trained and "21 and 25 degrees." in trained
    assert "temperature" not in trained and "get_weather\", \"description" not in trained
    assert TokenCounter(processor).count(conversation).tokens == sample["input_ids"].shape[0]
