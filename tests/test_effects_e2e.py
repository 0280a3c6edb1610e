"""End to end: a real ablation sweep on data where one finding depends only on age (conftest's planted_ablation,
shared with tests/test_sweeps.py), then the effect report.

The demographics arm must be reported as helping that finding (a call that survives the secondary family's false
discovery rate control), and an arm identical to the baseline never as helping or hurting anything: the
report's verdicts come from the saved validation probabilities in MLflow.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import PLANTED_AGE_FINDING as AGE_FINDING

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(planted_ablation, tmp_path_factory):
    assert planted_ablation["done"].returncode == 0
    out = tmp_path_factory.mktemp("effects") / "report"
    analysis = subprocess.run(
        [sys.executable, "dashboards/ablation_report.py", "--sweep", "abl", "--out", str(out),
         "--mlflow-uri", f"sqlite:///{planted_ablation['out'] / 'mlflow.db'}", "--n-boot", "500", "--no-log"],
        cwd=REPO, env=planted_ablation["env"], capture_output=True, text=True, timeout=TIMEOUT_S)
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
    assert {"effects.csv", "forest_mean_auc.png", "heatmap_auc.png", "ablation_report.html", "cost.csv",
            "cost_vs_effect.png", "shortcut_baselines.csv", "subgroup_gaps.csv", "subgroup_gaps.png"} <= \
        {p.name for p in out.iterdir()}


def test_metadata_alone_beats_the_image_model_on_the_age_finding_only(report):
    """The baseline arm sees no metadata: on the age-only finding the metadata model wins and the finding is
    flagged; on the findings drawn in the pixels the image model clearly beats it."""
    _, out = report
    shortcuts = pd.read_csv(out / "shortcut_baselines.csv").set_index("finding")
    print(shortcuts.to_string())
    age = shortcuts.loc[AGE_FINDING]
    assert age["metadata_auc"] > 0.85 and age["metadata_auc"] > age["image_auc"] + 0.2
    assert not age["clearly_beats_metadata"] and age["flag"] == "metadata alone does as well or better"
    pixels = shortcuts.drop(index=AGE_FINDING)
    assert (pixels["image_auc"] > pixels["metadata_auc"]).all()
    assert pixels["clearly_beats_metadata"].sum() >= 0.75 * len(pixels)      # the rarest may lack the positives
    # chance: the baseline's probabilities against shuffled labels sit near 0.5
    assert ((pixels["shuffled_auc"] - 0.5).abs() < 0.05).all()
    assert (pixels["shuffled_auc_95"] < pixels["image_auc"]).all()


def test_child_runs_carry_the_cost_of_their_arm(report):
    _, out = report
    cost = pd.read_csv(out / "cost.csv").set_index("arm")
    assert set(cost.index) == {"baseline", "baseline_copy", "age_sex"}
    # the same backbone: the same FLOPs per image, bar the 3 demographic inputs of age_sex's linear head
    assert cost.loc["baseline", "flops_per_image"] == cost.loc["baseline_copy", "flops_per_image"]
    assert cost.loc["age_sex", "flops_per_image"] == cost.loc["baseline", "flops_per_image"] + 2 * 3 * 14
    assert cost.loc["age_sex", "param_count"] == cost.loc["baseline", "param_count"] + 3 * 14
    assert (cost["trial_device_hours"] > 0).all() and (cost["peak_rss_mb"] > 10).all()
