"""Fixtures shared by the whole test suite."""
from __future__ import annotations

import os

# Before torch loads, as every entry point does (trainable/__main__.py, sweeps/cluster.py): spinning OpenMP waits
# make in-process trials several times slower on a shared machine (BENCHMARKS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from trainable.data.nih import DataSpec, prepare_dataset  # noqa: E402
from trainable.data.synthetic import generate  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic NIH-layout data set (60 patients, 64 px, seed 0), generated once per session.

    Shared: treat it as read-only; tests that modify a data set generate their own.
    """
    return generate(tmp_path_factory.mktemp("synthetic_nih"), patients=60, image_size=64, seed=0, layout="nih")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared (split) tiny data set for in-process trials: 80 patients, 32 px, seed 3; one per test module."""
    data_dir = generate(tmp_path_factory.mktemp("nih") / "data", patients=80, image_size=32, seed=3)
    return prepare_dataset(DataSpec(data_dir=str(data_dir)), tmp_path_factory.mktemp("split"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A module's own decode-once image cache folder."""
    return tmp_path_factory.mktemp("cache")
