"""Seeded mixing (build_mixture) and the jq-equivalent mixture_string."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qwenvl.data import DatasetSpec, MixtureEntry, build_mixture, mixture_counts, mixture_string
from qwenvl.data import load_dictionary, parse_dataset_use

import qwenvl

REPO = Path(qwenvl.__file__).parents[1]
JQ = ('to_entries | map("\\(.key)%\\((.value.repeat_time * 100 + 0.5) | floor)") | join(",")')
JQ_EITHER = ('to_entries | map("\\(.key)%\\(((.value.sampling_rate // .value.repeat_time // 1) '
             '* 100 + 0.5) | floor)") | join(",")')


def entry(name: str, rate: float) -> MixtureEntry:
    return MixtureEntry(DatasetSpec(name, f"{name}.json"), rate)


def rows_of(mix: np.ndarray, dataset: int) -> np.ndarray:
    return mix[mix[:, 0] == dataset, 1]


def test_250_percent_is_two_copies_plus_a_seeded_half():
    mix = build_mixture([entry("a", 2.5)], [10], seed=0)
    assert mix.shape == (25, 2) and mix.dtype == np.int64
    rows = rows_of(mix, 0)
    assert rows[:20].tolist() == list(range(10)) * 2  # two full copies, file order
    extra = rows[20:]
    assert len(set(extra.tolist())) == 5 and extra.tolist() == sorted(extra.tolist())


@pytest.mark.parametrize("rate, n, expected", [
    (0.5, 10, 5), (1.0, 7, 7), (0.0, 9, 0), (0.125, 8, 1), (3.0, 4, 12), (0.29, 100, 29),
    (1.999, 10, 20), (0.05, 3, 0),
])
def test_counts_are_rounded_rate_times_length(rate, n, expected):
    mix = build_mixture([entry("a", rate)], [n], seed=1)
    assert len(mix) == expected == mixture_counts([entry("a", rate)], [n])[0]
    if rate <= 1:
        assert len(set(mix[:, 1].tolist())) == expected  # a subset: no record twice


def test_entries_keep_their_order_and_dataset_index():
    mix = build_mixture([entry("a", 1.0), entry("b", 0.5), entry("c", 2.0)], [3, 4, 2], seed=0)
    assert mix[:, 0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert rows_of(mix, 2).tolist() == [0, 1, 0, 1]


def test_seeded_same_seed_same_subset_other_seed_other_subset():
    e = [entry("a", 0.5)]
    first = build_mixture(e, [1000], seed=42)
    assert np.array_equal(first, build_mixture(e, [1000], seed=42))
    assert not np.array_equal(first, build_mixture(e, [1000], seed=43))


def test_subset_depends_on_name_not_on_other_entries():
    alone = build_mixture([entry("a", 0.5)], [100], seed=7)
    mixed = build_mixture([entry("z", 0.3), entry("a", 0.5)], [50, 100], seed=7)
    assert np.array_equal(rows_of(alone, 0), rows_of(mixed, 1))
    other_name = build_mixture([entry("b", 0.5)], [100], seed=7)
    assert not np.array_equal(rows_of(alone, 0), rows_of(other_name, 0))


def test_same_subset_in_another_process():
    # Python's hash() is salted per process; the seed must not use it.
    code = ("from qwenvl.data import *; import sys;"
            "m = build_mixture([MixtureEntry(DatasetSpec('a', 'a.json'), 0.5)], [50], 3);"
            "print(m[:, 1].tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO, env={**os.environ, "PYTHONHASHSEED": "123"})
    here = build_mixture([entry("a", 0.5)], [50], 3)[:, 1].tolist()
    assert json.loads(out.stdout) == here


def test_mismatched_lengths_rejected():
    with pytest.raises(ValueError, match="2 mixture entries but 1 lengths"):
        build_mixture([entry("a", 1), entry("b", 1)], [3], seed=0)
    assert build_mixture([], [], seed=0).shape == (0, 2)


def test_from_dataset_use_to_rows(tmp_path, write_json):
    write_json(tmp_path / "d.json", {"a": {"annotation_path": "a"}, "b": {"annotation_path": "b",
                                                                         "repeat_time": 2}})
    entries = parse_dataset_use("a%50,b", load_dictionary(tmp_path / "d.json", check_files=False))
    assert mixture_counts(entries, [10, 3]) == [5, 6]


# ----------------------------------------------------------------------------- mixture_string

RATES = {"one": 1, "half": 0.5, "quarter_and_a_bit": 0.285, "tricky": 0.145, "many": 2.5,
         "tiny": 0.004, "zero": 0, "big": 12.3456}


def test_mixture_string_rounds_like_jq(tmp_path, write_json):
    write_json(tmp_path / "d.json", {n: {"annotation_path": "x", "repeat_time": r}
                                     for n, r in RATES.items()})
    specs = load_dictionary(tmp_path / "d.json", check_files=False)
    # floor(r * 100 + 0.5) in doubles: 0.285 * 100 = 28.499999999999996 -> 28, 0.145 -> 14
    assert mixture_string(specs) == ("one%100,half%50,quarter_and_a_bit%28,tricky%14,many%250,"
                                     "tiny%0,zero%0,big%1235")


def test_mixture_string_reads_either_rate_default_100(tmp_path, write_json):
    write_json(tmp_path / "d.json", {"a": {"annotation_path": "x", "sampling_rate": 0.3},
                                     "b": {"annotation_path": "x", "repeat_time": 2.5},
                                     "c": {"annotation_path": "x"}})
    assert mixture_string(load_dictionary(tmp_path / "d.json", check_files=False)) == \
        "a%30,b%250,c%100"


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")
def test_mixture_string_equals_real_jq(tmp_path, write_json):
    path = write_json(tmp_path / "d.json", {n: {"annotation_path": "x", "repeat_time": r}
                                            for n, r in RATES.items()}, indent=2)
    jq = subprocess.run(["jq", "-r", JQ, str(path)], capture_output=True, text=True, check=True)
    assert mixture_string(load_dictionary(path, check_files=False)) == jq.stdout.strip()
    mixed = write_json(tmp_path / "m.json", {"s": {"annotation_path": "x", "sampling_rate": 0.07},
                                             "r": {"annotation_path": "x", "repeat_time": 1.005},
                                             "none": {"annotation_path": "x"}})
    jq = subprocess.run(["jq", "-r", JQ_EITHER, str(mixed)], capture_output=True, text=True,
                        check=True)
    assert mixture_string(load_dictionary(mixed, check_files=False)) == jq.stdout.strip()
