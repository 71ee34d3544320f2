"""The test run's defaults: a bare `pytest` is the quick subset, scripts/test.sh (CI) runs everything."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLOW_FILE = "tests/e2e/test_demo.py"  # every test in it is marked slow


def _collected(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", SLOW_FILE, *args],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    return out.stdout


def test_bare_pytest_deselects_slow_tests():
    assert "deselected" in _collected().splitlines()[-1]
    assert "::" not in _collected()


def test_test_script_selection_runs_slow_tests():
    script = (REPO / "scripts/test.sh").read_text()
    # the selection the script hands pytest: -m "" first, so a -m among the user's arguments wins
    assert 'python -m pytest -m "" "$@"' in script
    listed = _collected("-m", "")
    assert "test_demo.py::" in listed and "deselected" not in listed
