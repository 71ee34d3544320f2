"""The dataset dictionary (``dataset_dictionary.json``) and ``--dataset_use`` parsing.

The dictionary replaces the official code's registry-as-Python-code::

    {
      "llava_665k": {"annotation_path": "anns/llava_665k.json", "data_path": "images/",
                     "sampling_rate": 0.3, "length": 665298},
      "my_video":   {"annotation_path": "/data/video.jsonl", "data_path": "s3://bucket/videos",
                     "repeat_time": 2.5}
    }

Relative paths resolve against the dictionary file's folder. ``sampling_rate``
and ``repeat_time`` are two spellings of one number, the fraction of the dataset
used per epoch (give at most one); ``length`` is an optional record count that
is checked against the file; ``bbox_format`` says which coordinates the records'
boxes and points are in (see ``qwenvl/data/render/grounding.py``); ``enable_thinking`` (``true``,
``false`` or ``"auto"``) sets the Qwen3.5/3.6 thinking mode of that dataset's records, over
``--enable_thinking`` (see ``qwenvl/data/render/chat_pieces.py``). Every problem in a dictionary is collected and
raised together in one ``DataError``, each with its fix.
"""
from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from qwenvl.data.errors import DataError, DataKind, where
from qwenvl.data.media.read import is_url

__all__ = ["DatasetSpec", "MixtureEntry", "DEFAULT_DICTIONARY", "load_dictionary",
           "parse_dataset_use"]

logger = logging.getLogger(__name__)

DEFAULT_DICTIONARY = Path(__file__).parents[3] / "dataset_dictionary.json"
KEYS = ("annotation_path", "data_path", "sampling_rate", "repeat_time", "length", "bbox_format", "enable_thinking")
# The coordinate conventions a dataset's boxes/points may be declared in (qwenvl/data/render/grounding.py).
BBOX_FORMATS = ("abs_original", "abs_resized", "rel_1", "rel_1000")
_NAME_FORBIDDEN = "%,"
# A dataset's "enable_thinking": JSON true/false or "auto" (the strings "true"/"false" of the flag too),
# stored as --enable_thinking's value ("auto", "true", "false").
THINKING_VALUES = {True: "true", False: "false", "auto": "auto", "true": "true", "false": "false"}


def thinking_value(value: Any) -> str | None:
    """A dictionary's (or record's) ``enable_thinking`` as a mode ("auto", "true", "false"), None if invalid."""
    if isinstance(value, bool) or isinstance(value, str):
        return THINKING_VALUES.get(value)
    return None


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the dictionary, with paths already resolved."""

    name: str
    annotation_path: str
    data_path: str = ""
    sampling_rate: float | None = None
    repeat_time: float | None = None
    length: int | None = None
    bbox_format: str | None = None  # coordinates of the records' boxes/points; None: the family's own
    # Qwen3.5/3.6 thinking mode of this dataset's records ("auto", "true", "false"); None: --enable_thinking's.
    enable_thinking: str | None = None

    @property
    def rate(self) -> float:
        """Fraction of the dataset used per epoch: sampling_rate, else repeat_time, else 1.0."""
        if self.sampling_rate is not None:
            return float(self.sampling_rate)
        if self.repeat_time is not None:
            return float(self.repeat_time)
        return 1.0


@dataclass(frozen=True)
class MixtureEntry:
    """One item of ``--dataset_use``: a dataset and the fraction of it to use (2.5 = 250%)."""

    spec: DatasetSpec
    rate: float


def _did_you_mean(word: str, choices) -> str:
    choices = list(choices)
    # Names are case-sensitive; difflib scores 'COCO' against 'coco' as no match at all.
    same_but_case = [c for c in choices if c.lower() == word.lower()]
    close = same_but_case or difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _raise_all(header: str, problems: list[str]) -> None:
    if problems:
        lines = "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1))
        noun = "problem" if len(problems) == 1 else "problems"
        raise DataError(f"{header}: {len(problems)} {noun}:\n{lines}", DataKind.CONFIG)


def _json_problem(text: str, err: json.JSONDecodeError) -> str:
    """Word a JSON syntax error with line/column, recognising the classic trailing comma."""
    i = err.pos
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    j = err.pos - 1
    while j >= 0 and text[j] in " \t\r\n":
        j -= 1
    if i < len(text) and text[i] in "}]" and j >= 0 and text[j] == ",":
        line = text.count("\n", 0, j) + 1
        col = j - (text.rfind("\n", 0, j) + 1) + 1
        return (f"invalid JSON: trailing comma at line {line}, column {col} (before the "
                f"'{text[i]}'). Fix: delete that comma; JSON allows no comma after the last item.")
    return (f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}. Fix: correct the "
            "syntax there (a JSON validator such as `python -m json.tool FILE` shows it too).")


def _resolve(path: str, folder: Path) -> str:
    if path.startswith("file://"):
        path = path[len("file://"):]
    if is_url(path):
        return path
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(folder / path)


def _check_rate(key: str, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return (f"'{key}' must be a number such as 0.3 or 2.5, got {value!r}. Fix: write it as "
                "a bare number (a fraction, not a percentage string).")
    if not math.isfinite(value) or value < 0:
        return f"'{key}' must be a finite number >= 0, got {value!r}. Fix: use e.g. 0.5 or 2."
    return None


def _parse_entry(name: str, value: Any, folder: Path, problems: list[str],
                 check_files: bool) -> DatasetSpec | None:
    at = where(dataset=name)
    if not isinstance(value, dict):
        problems.append(f"{at}: expected an object like {{\"annotation_path\": ...}}, got "
                        f"{type(value).__name__}. Fix: give the dataset's settings as an object.")
        return None
    start = len(problems)
    bad_name = (not name or name != name.strip() or any(c in name for c in _NAME_FORBIDDEN))
    if bad_name:
        problems.append(f"{at}: the name must be non-empty, without surrounding spaces, '%' or "
                        "','. Fix: rename it (these characters are --dataset_use syntax).")
    for key in value:
        if key not in KEYS:
            problems.append(f"{at}: unknown key '{key}'.{_did_you_mean(key, KEYS)} Fix: use only "
                            f"{', '.join(KEYS)}.")
    ann = value.get("annotation_path")
    if not isinstance(ann, str) or not ann:
        problems.append(f"{at}: 'annotation_path' is missing or not a non-empty string. Fix: "
                        "give the path of the .json/.jsonl file or saved HF dataset folder.")
        ann = None
    data = value.get("data_path")
    if data is None:
        data = ""
    elif not isinstance(data, str):
        problems.append(f"{at}: 'data_path' must be a string (the media folder), got {data!r}. "
                        "Fix: give a folder path or URL, or \"\" for text-only data.")
        data = ""
    rates = {}
    for key in ("sampling_rate", "repeat_time"):
        if value.get(key) is not None:
            msg = _check_rate(key, value[key])
            if msg:
                problems.append(f"{at}: {msg}")
            else:
                rates[key] = float(value[key])
    if value.get("sampling_rate") is not None and value.get("repeat_time") is not None:
        problems.append(f"{at}: both 'sampling_rate' and 'repeat_time' are given; they are the "
                        "same number (fraction of the dataset per epoch). Fix: keep only one.")
    length = value.get("length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int)
                               or length < 0):
        problems.append(f"{at}: 'length' must be a whole number of records >= 0, got "
                        f"{length!r}. Fix: correct it or remove the key.")
        length = None
    bbox_format = value.get("bbox_format")
    if bbox_format is not None and bbox_format not in BBOX_FORMATS:
        problems.append(f"{at}: 'bbox_format' must be one of {', '.join(BBOX_FORMATS)}, got {bbox_format!r}."
                        f"{_did_you_mean(str(bbox_format), BBOX_FORMATS)} Fix: abs_original for pixels of the "
                        "image files, abs_resized for pixels after the processor's resize, rel_1 for 0-1 "
                        "fractions, rel_1000 for the 0-1000 scale.")
    thinking = value.get("enable_thinking")
    if thinking is not None:
        thinking = thinking_value(thinking)
        if thinking is None:
            problems.append(f"{at}: 'enable_thinking' must be true, false or \"auto\", got "
                            f"{value['enable_thinking']!r}. Fix: true trains every answer of the dataset in "
                            "thinking mode, false in non-thinking mode (reasoning dropped), \"auto\" each answer "
                            "in the mode its reasoning implies; remove the key to follow --enable_thinking.")
    ann = _resolve(ann, folder) if ann else None
    data = _resolve(data, folder) if data else ""
    if check_files and ann:
        _check_paths(name, ann, data, length, value, problems)
    if len(problems) > start or ann is None:
        return None
    return DatasetSpec(name=name, annotation_path=ann, data_path=data,
                       sampling_rate=rates.get("sampling_rate"),
                       repeat_time=rates.get("repeat_time"), length=length, bbox_format=bbox_format,
                       enable_thinking=thinking)


def _check_paths(name: str, ann: str, data: str, length: int | None, raw: dict,
                 problems: list[str]) -> None:
    """Existence of local annotation files and media folders, and the declared length."""
    at = where(dataset=name)
    ann_ok = True
    if not is_url(ann) and not os.path.exists(ann):
        ann_ok = False
        problems.append(f"{at}: annotation file not found: {ann} (from "
                        f"{raw.get('annotation_path')!r}). Fix: correct 'annotation_path'; "
                        "relative paths resolve against the dictionary's folder.")
    if data and not is_url(data) and not os.path.isdir(data):
        what = "is not a folder" if os.path.exists(data) else "not found"
        problems.append(f"{at}: media folder {what}: {data} (from {raw.get('data_path')!r}). "
                        "Fix: correct 'data_path', or set it to \"\" for text-only data.")
    if ann_ok and length is not None and not is_url(ann):
        from qwenvl.data.catalog.sources import open_annotations  # local import: registry stays cheap to import
        try:
            actual = len(open_annotations(ann))
        except DataError as e:
            problems.append(f"{at}: {e}")
            return
        if actual != length:
            problems.append(f"{at}: 'length' is {length} but {ann} holds {actual} records. "
                            f"Fix: set \"length\": {actual}, or remove the key.")


def load_dictionary(path: str | os.PathLike | None = None, *,
                    check_files: bool = True) -> dict[str, DatasetSpec]:
    """Read and validate a dataset dictionary; ``None`` means the repo's dataset_dictionary.json.

    All problems are collected and raised as one DataError. ``check_files`` also
    checks that local annotation files and media folders exist and that each
    declared ``length`` matches the file (cheap: it is the index length).
    """
    path = Path(DEFAULT_DICTIONARY if path is None else path)
    header = f"dataset dictionary {path}"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{header} not found. Fix: create it (see qwenvl/data/catalog/registry.py for "
                        "the format) or pass --dataset_dictionary PATH.", DataKind.CONFIG) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{header} cannot be read: {e}.", DataKind.CONFIG) from None
    problems: list[str] = []
    pairs_seen: list[str] = []

    def keep_top_pairs(pairs):
        pairs_seen.append(pairs)
        return dict(pairs)

    try:
        raw = json.loads(text, object_pairs_hook=keep_top_pairs)
    except json.JSONDecodeError as e:
        _raise_all(header, [_json_problem(text, e)])
    if not isinstance(raw, dict):
        _raise_all(header, [f"the top level must be an object mapping names to datasets, got "
                            f"{type(raw).__name__}. Fix: write {{\"name\": {{...}}, ...}}."])
    # The last object the hook saw is the top level: look there for names given twice.
    names = [k for k, _ in pairs_seen[-1]]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{where(dataset=dup)}: defined {names.count(dup)} times; JSON keeps only "
                        "the last one. Fix: rename or delete the extra definitions.")
    specs = {}
    for name, value in raw.items():
        spec = _parse_entry(name, value, path.parent, problems, check_files)
        if spec is not None:
            specs[name] = spec
    _raise_all(header, problems)
    return specs


_PERCENT_FORMS = "'name' (its own rate), 'name%50' (half) or 'name%250' (2.5 copies)"


def parse_dataset_use(text: str, dictionary: Mapping[str, DatasetSpec]) -> list[MixtureEntry]:
    """Parse ``--dataset_use``: ``"a%50, b%250, c"`` -> one MixtureEntry per item, in order.

    ``%P`` (integer or decimal, e.g. ``a%12.5``) uses P percent of the dataset:
    below 100 a seeded subset, 100 all of it, above 100 repeats it. Without ``%``
    the dataset's own sampling_rate / repeat_time applies. Every problem (bad
    syntax, unknown names, a dataset given twice) is reported in one DataError.
    """
    problems, entries, seen = [], [], set()
    items = [] if text is None else str(text).split(",")
    if not any(item.strip() for item in items):
        raise DataError(f"--dataset_use is empty. Fix: list datasets like {_PERCENT_FORMS}; "
                        f"known: {_known(dictionary)}.", DataKind.CONFIG)
    for item in items:
        name, sep, percent = (s.strip() for s in item.partition("%"))
        if not name:
            problems.append(f"empty item {item!r} (a doubled or trailing comma, or nothing "
                            f"before '%'). Fix: write items as {_PERCENT_FORMS}.")
            continue
        rate = None
        if sep:
            if not percent:
                problems.append(f"'{item.strip()}': no number after '%'. Fix: write e.g. "
                                f"'{name}%50', or drop the '%' to use its own rate.")
            elif percent.startswith("-"):
                problems.append(f"'{item.strip()}': a percentage cannot be negative. Fix: use "
                                f"a number >= 0, e.g. '{name}%50'.")
            elif not re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", percent):
                problems.append(f"'{item.strip()}': '{percent}' is not a number. Fix: write "
                                f"e.g. '{name}%50' or '{name}%12.5'.")
            else:
                rate = float(percent) / 100.0
                if 0 < rate < 0.01:
                    # The dictionary's sampling_rate is a fraction (0.5 = half) and this is a percentage, so a
                    # fraction written here keeps almost nothing; only a rate rounding to 0 samples fails later.
                    logger.warning("--dataset_use '%s': %s%% keeps %s%% of the dataset ('%%' takes a percentage; the "
                                   "dictionary's sampling_rate is a fraction). For %g%% of it, write '%s%%%g'.",
                                   item.strip(), percent, percent, rate * 10000, name, rate * 10000)
        if name not in dictionary:
            problems.append(f"unknown dataset '{name}'.{_did_you_mean(name, dictionary)} Fix: "
                            f"use a name from the dataset dictionary: {_known(dictionary)}.")
            continue
        if name in seen:
            problems.append(f"dataset '{name}' is listed twice. Fix: list it once with the "
                            "combined percentage.")
            continue
        seen.add(name)
        if rate is not None or not sep:
            spec = dictionary[name]
            entries.append(MixtureEntry(spec, spec.rate if rate is None else rate))
    _raise_all(f"--dataset_use {text!r}", problems)
    return entries


def _known(dictionary: Mapping[str, Any], limit: int = 40) -> str:
    names = list(dictionary)
    if not names:
        return "(none: the dictionary is empty)"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
