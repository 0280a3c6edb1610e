"""Fixtures shared by the whole test suite."""
from __future__ import annotations

from pathlib import Path

import pytest

from trainable.data.synthetic import generate


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic NIH-layout data set (60 patients, 64 px, seed 0), generated once per session.

    Shared: treat it as read-only; tests that modify a data set generate their own.
    """
    return generate(tmp_path_factory.mktemp("synthetic_nih"), patients=60, image_size=64, seed=0, layout="nih")
