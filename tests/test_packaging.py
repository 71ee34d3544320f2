"""Our own pyproject.toml installs without setuptools deprecation warnings."""
from __future__ import annotations

import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_applies_without_deprecation_warnings():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), REPO / "pyproject.toml")
    messages = [str(w.message) for w in caught]
    # The TOML-table license printed a "project.license as a TOML table is deprecated" box at every install.
    assert not [m for m in messages if "deprecated" in m.lower()], messages
    assert dist.metadata.license_expression == "Apache-2.0"
