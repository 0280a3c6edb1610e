"""Fixtures shared by the whole test suite."""
from __future__ import annotations

import os

# Before torch loads, as every entry point does (trainable/__main__.py, sweeps/cluster.py): spinning OpenMP waits
# make in-process trials several times slower on a shared machine (BENCHMARKS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from trainable.data.nih import DataSpec, prepare_dataset  # noqa: E402
from trainable.data.synthetic import generate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PLANTED_AGE_FINDING = "Pneumonia"
PLANTED_ARMS, PLANTED_SEEDS, PLANTED_EPOCHS = ["baseline", "baseline_copy", "age_sex"], 2, 4


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


@pytest.fixture(scope="session")
def planted_ablation(tmp_path_factory) -> dict:
    """One ablation sweep `abl` as the user runs it (`python sweeps/run_ablation.py` in a subprocess, a local Ray,
    the embedded MLflow store in its --out), shared by the sweep tests and the effect report's: generated data
    where PLANTED_AGE_FINDING depends on age only, the baseline, an arm identical to it (baseline_copy) and the
    age_sex demographics arm, 2 seeds x 4 epochs of test_resnet at 32 px.

    Returns {"out", "done" (the CompletedProcess), "env"}. Shared: read it, copy it to change it.
    """
    work = tmp_path_factory.mktemp("planted_ablation")
    data = generate(work / "data", patients=240, image_size=32, seed=5, age_dependent_finding=PLANTED_AGE_FINDING)
    (work / "arms.yaml").write_text("baseline_copy: {factor: control}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(CXR_CACHE_DIR=str(work / "cache"), PYTHONUNBUFFERED="1")
    done = subprocess.run(
        [sys.executable, "sweeps/run_ablation.py", "--data", str(data), "--out", str(work / "runs"), "--name", "abl",
         "--arms-file", str(work / "arms.yaml"), "--arms", ",".join(PLANTED_ARMS), "--seeds", str(PLANTED_SEEDS),
         "--epochs", str(PLANTED_EPOCHS), "--val-fraction", "0.3", "--cpus-per-trial", "1",
         "--set", "backbone=test_resnet", "--set", "pretrained=none", "--set", "image_size=32",
         # a higher lr than CheXNet's lets the tiny model learn the age weight within the few steps of a test
         "--set", "batch_size=16", "--set", "lr=0.01"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    print(done.stdout[-4000:], done.stderr[-4000:], sep="\n")      # shown by pytest when a test fails
    return {"out": work / "runs", "done": done, "env": env}
