"""budget_for_samples: the token budget that gives a number of samples per step on average."""
import numpy as np
import pytest

from qwenvl.data.batch.budget import budget_for_samples
from qwenvl.data.batch.packing import pack_items


def test_budget_is_samples_times_mean_over_accumulation_and_skips_unusable_rows():
    table = np.array([[100, 20, 80], [300, 0, 0], [-1, -1, -1], [200, 64, 256]])
    assert budget_for_samples(table, 16) == (3200, 200.0)
    assert budget_for_samples(table, 16, accumulation_steps=4) == (800, 200.0)
    assert budget_for_samples(np.array([100, 900]), 1)[0] == 900  # never below the longest sample


def test_packing_with_the_budget_gives_about_the_asked_samples_per_pack():
    rng = np.random.default_rng(0)
    tokens = rng.integers(50, 1500, size=4000)
    budget, _ = budget_for_samples(tokens, 16)
    packs = pack_items(tokens, budget).packs
    assert len(tokens) / len(packs) == pytest.approx(16, rel=0.05)


def test_budget_needs_positive_counts_and_a_usable_sample():
    with pytest.raises(ValueError):
        budget_for_samples(np.array([10]), 0)
    with pytest.raises(ValueError):
        budget_for_samples(np.array([-1, 0]), 4)
