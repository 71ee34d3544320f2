"""``check_conversation`` on layouts users bring: a tool-call turn is an answer, not an empty one.

LLaMA-Factory's sharegpt ``function_call`` turn and an OpenAI/TRL assistant message with
``tool_calls`` and no ``content`` have no text, yet what trains there is the call the template
writes (``tests/data/test_layouts.py`` checks the rendering); the empty-answer rule is for
turns that would train only ``<|im_end|>``.
"""
from __future__ import annotations

import json

import pytest

from qwenvl.data.catalog.conversation_checks import check_conversation
from qwenvl.data.catalog.formats import to_conversation
from qwenvl.data.catalog.registry import DatasetSpec
from qwenvl.data.errors import DataError, DataKind

CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
SHAREGPT = {"tools": json.dumps([WEATHER]), "conversations": [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": json.dumps(CALL)},
    {"from": "observation", "value": "sunny"},
    {"from": "gpt", "value": "Sunny."}]}
MESSAGES = {"tools": [WEATHER], "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": CALL}]},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "Sunny."}]}


def _conversation(record):
    return to_conversation(record, DatasetSpec(name="tools", annotation_path="/d/tools.jsonl", data_path=""), 2)


@pytest.mark.parametrize("record", [SHAREGPT, MESSAGES], ids=["sharegpt_function_call", "messages_tool_calls"])
def test_a_tool_call_turn_without_text_is_not_an_empty_answer(record):
    check_conversation(_conversation(record))  # raises DataError(empty_answer) without the tool-call exemption


def test_an_empty_answer_without_tool_calls_is_still_refused():
    record = {"messages": [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": " "}]}
    with pytest.raises(DataError) as info:
        check_conversation(_conversation(record))
    assert info.value.kind == DataKind.EMPTY_ANSWER
    assert "file /d/tools.jsonl, record 2, turn 1" in str(info.value)
