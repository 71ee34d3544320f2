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


def test_a_passing_tests_tmp_path_is_removed_and_a_failing_ones_kept(tmp_path):
    """The suite's checkpoints must not pile up on the disk until the session ends (they filled a CI disk)."""
    inner = tmp_path / "test_inner.py"
    record = tmp_path / "paths"
    inner.write_text(
        "def _write(tmp_path, name):\n"
        "    (tmp_path / 'weights.bin').write_bytes(b'0' * 1024)\n"
        f"    with open({str(record)!r}, 'a') as f:\n"
        "        f.write(f'{name} {tmp_path}\\n')\n"
        "def test_passes(tmp_path):\n"
        "    _write(tmp_path, 'passed')\n"
        "def test_fails(tmp_path):\n"
        "    _write(tmp_path, 'failed')\n"
        "    assert False, 'kept for inspection'\n")
    # the project's own pytest configuration, a basetemp of this test's own (so nothing else is touched)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(REPO / "pyproject.toml"),
                    "--rootdir", str(tmp_path), "--basetemp", str(tmp_path / "base"), str(inner)],
                   cwd=tmp_path, capture_output=True, text=True, timeout=300)
    written = dict(line.split(" ", 1) for line in record.read_text().splitlines())
    assert set(written) == {"passed", "failed"}
    assert not Path(written["passed"]).exists()
    assert (Path(written["failed"]) / "weights.bin").is_file()
