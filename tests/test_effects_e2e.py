"""End to end: a real ablation sweep on data where one finding depends only on age, then the effect report.

The demographics arm must be reported as helping that finding (a call that survives the secondary family's false
discovery rate control), and an arm identical to the baseline never as helping or hurting anything: the
report's verdicts come from the saved validation probabilities in MLflow.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from trainable.data.synthetic import generate

REPO = Path(__file__).resolve().parents[1]
AGE_FINDING = "Pneumonia"
TIMEOUT_S = 900

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    work = tmp_path_factory.mktemp("effects")
    data = generate(work / "data", patients=240, image_size=32, seed=5, age_dependent_finding=AGE_FINDING)
    arms_file = work / "arms.yaml"
    arms_file.write_text("baseline_copy: {factor: control}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["CXR_CACHE_DIR"] = str(work / "cache")
    sweep = subprocess.run(
        [sys.executable, "sweeps/run_ablation.py", "--data", str(data), "--out", str(work / "runs"),
         "--name", "age", "--arms-file", str(arms_file), "--arms", "baseline,baseline_copy,age_sex",
         "--seeds", "2", "--epochs", "4", "--val-fraction", "0.3", "--cpus-per-trial", "1",
         "--set", "backbone=test_resnet", "--set", "pretrained=none", "--set", "image_size=32",
         # a higher lr than CheXNet's lets the tiny model learn the age weight within the few steps of a test
         "--set", "batch_size=16", "--set", "lr=0.01"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    print(sweep.stdout[-4000:], sweep.stderr[-4000:], sep="\n")
    assert sweep.returncode == 0
    out = work / "report"
    analysis = subprocess.run(
        [sys.executable, "dashboards/ablation_report.py", "--sweep", "age", "--out", str(out),
         "--mlflow-uri", f"sqlite:///{work / 'runs' / 'mlflow.db'}", "--n-boot", "500"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    print(analysis.stdout[-4000:], analysis.stderr[-4000:], sep="\n")
    assert analysis.returncode == 0
    return pd.read_csv(out / "effects.csv"), out


def verdict(effects: pd.DataFrame, arm: str, finding: str, metric: str = "auc") -> pd.Series:
    row = effects[(effects["arm"] == arm) & (effects["finding"] == finding) & (effects["metric"] == metric)]
    assert len(row) == 1, (arm, finding, metric)
    return row.iloc[0]


def test_demographics_arm_helps_the_age_only_finding(report):
    effects, _ = report
    row = verdict(effects, "age_sex", AGE_FINDING)
    assert row["verdict"] == "helps", row.to_dict()
    assert row["ci_low"] > 0 and row["n_seeds"] == 2 and row["family"] == "secondary" and row["p_adjusted"] <= 0.05


def test_arm_identical_to_baseline_is_never_called_different(report):
    effects, _ = report
    copy = effects[effects["arm"] == "baseline_copy"]
    assert len(copy) > 0
    assert (copy["verdict"].isin(["inconclusive", "equivalent", "not estimable"])).all(), copy.to_dict("records")
    mean = verdict(effects, "baseline_copy", "mean")
    assert mean["verdict"] in ("inconclusive", "equivalent") and mean["family"] == "primary"
    # with 2 seeds the report says what it could have detected, and how many seeds would decide it
    assert 0 < mean["mde"] < 1 and mean["p_value"] == mean["p_value"]


def test_report_files_are_written(report):
    _, out = report
    assert {"effects.csv", "forest_mean_auc.png", "heatmap_auc.png", "ablation_report.html"} <= \
        {p.name for p in out.iterdir()}
