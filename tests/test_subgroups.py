"""Subgroup metrics (dashboards/subgroups.py): on a generated data set whose Effusion labels are flipped for 30% of
the women (the pixels keep the truth), an image model's Effusion AUC gap between the sexes has a CI above 0, and
no other sex gap does; group metrics equal a direct computation; age bands and unknown values."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from dashboards.subgroups import UNDERDIAGNOSIS, UNKNOWN, subgroup_report
from trainable.data.nih import load_metadata
from trainable.data.synthetic import generate
from trainable.findings import FINDINGS
from trainable.metrics import choose_thresholds

PLANTED = "Effusion"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Test-split metadata, labels, probabilities of a pixel logistic regression, validation-chosen thresholds."""
    meta = load_metadata(generate(tmp_path_factory.mktemp("planted"), patients=300, image_size=16, seed=7,
                                  female_noise_finding=PLANTED))
    pixels = np.stack([np.asarray(Image.open(path), np.float32).ravel() / 255 for path in meta["path"]])
    labels = meta[list(FINDINGS)].to_numpy()
    part = (meta["patient_id"] % 3).to_numpy()                 # patient-wise train / validation / test
    probs = np.column_stack([LogisticRegression(C=0.1, max_iter=500).fit(pixels[part == 0], labels[part == 0, k])
                             .predict_proba(pixels)[:, 1] for k in range(len(FINDINGS))])
    thresholds = choose_thresholds(labels[part == 1], probs[part == 1])
    test = part == 2
    return meta[test].reset_index(drop=True), labels[test], probs[test], thresholds


def test_planted_label_noise_for_women_shows_a_gap_whose_ci_excludes_zero(planted):
    report = subgroup_report(*planted)
    sex = report.gaps.loc["sex"]
    print(sex.round(3).to_string())
    assert sex.loc[PLANTED, ["high", "low"]].tolist() == ["M", "F"]
    assert sex.loc[PLANTED, "gap_ci_low"] > 0 and sex.loc[PLANTED, "gap_holm"]
    others = sex.drop(index=PLANTED)            # nothing planted: no gap at a family-wise 5% (Holm)
    assert not others["gap_holm"].any(), others[others["gap_holm"]]
    gaps = report.gaps
    assert (gaps["gap_ci_low"] <= gaps["gap"]).all() and ((gaps["gap_ci_low"] > 0) == gaps["gap_holm"]).all()


def test_group_metrics_equal_a_direct_computation(planted):
    frame, labels, probs, thresholds = planted
    report = subgroup_report(frame, labels, probs, thresholds)
    for attribute, group, rows in (("sex", "F", frame["sex"] == "F"), ("view", "PA", frame["view"] == "PA"),
                                   ("age", "40-60", frame["age"].between(40, 60, inclusive="left"))):
        rows = rows.to_numpy()
        row = report.by_group.loc[(attribute, group)]
        assert row["images"] == rows.sum() and row["patients"] == frame.loc[rows, "patient_id"].nunique()
        k = FINDINGS.index("Cardiomegaly")
        assert row["Cardiomegaly"] == pytest.approx(roc_auc_score(labels[rows, k], probs[rows, k]))
        sick = rows & labels.any(axis=1)
        missed = ~(probs[sick] >= thresholds).any(axis=1)
        assert row[UNDERDIAGNOSIS] == pytest.approx(missed.mean())


def test_age_bands_and_unknown_values_stay_apart_from_gaps():
    frame = pd.DataFrame({"patient_id": np.arange(12), "age": [5, 19.9, 20, 39, 45, 61, 79.9, 80, 95, np.nan, 50, 30],
                          "sex": ["M", "F", "", "M", "F", "M", "F", "M", "F", "M", "F", "M"],
                          "view": ["PA", "AP"] * 6})
    labels = np.zeros((12, len(FINDINGS)))
    labels[:, 0] = 1                                           # everyone sick: underdiagnosis defined per group
    probs = np.random.default_rng(1).random(labels.shape)
    report = subgroup_report(frame, labels, probs, np.full(len(FINDINGS), 0.9))
    ages = report.by_group.loc["age", "images"].to_dict()
    assert ages == {"0-20": 2, "20-40": 3, "40-60": 2, "60-80": 2, "80+": 2, UNKNOWN: 1}
    assert report.by_group.loc[("sex", UNKNOWN), "images"] == 1
    assert UNDERDIAGNOSIS in report.gaps.loc["sex"].index
    assert UNKNOWN not in set(report.gaps["high"]) | set(report.gaps["low"])


def test_a_group_whose_positives_are_one_patients_has_no_gap_decision():
    """One patient's images are all of the women's positives: no variance, so no test and an unbounded CI."""
    rng = np.random.default_rng(0)
    sex = np.array(["F"] * 10 + list(rng.choice(["M", "F"], 50)))
    frame = pd.DataFrame({"patient_id": np.r_[np.zeros(10, int), np.arange(1, 51)], "sex": sex, "age": 50.0,
                          "view": "PA"})
    labels = np.zeros((60, len(FINDINGS)))
    labels[:10, 0], labels[10:40, 0] = 1, sex[10:40] == "M"
    row = subgroup_report(frame, labels, rng.random(labels.shape), np.full(len(FINDINGS), 0.5)).gaps.loc[
        ("sex", FINDINGS[0])]
    assert row["p_value"] == 1 and not row["gap_holm"] and np.isinf(row["gap_ci_low"]) and np.isnan(row["gap_se"])


def test_a_missing_label_leaves_the_image_out_of_that_findings_auc_only(planted):
    """An external set's unlabelled finding (NaN) on some images: that finding's group AUCs and gap are those of the
    labelled images alone; the other findings, and underdiagnosis (NaN counts as absent), are unchanged."""
    frame, labels, probs, thresholds = planted
    k = FINDINGS.index("Atelectasis")
    unlabelled = np.random.default_rng(3).random(len(labels)) < 0.3
    holes = labels.astype(float).copy()
    holes[unlabelled, k] = np.nan
    report = subgroup_report(frame, holes, probs, thresholds)
    labelled = subgroup_report(frame[~unlabelled].reset_index(drop=True), labels[~unlabelled], probs[~unlabelled],
                               thresholds)
    sex = (frame["sex"] == "F").to_numpy()
    assert report.by_group.loc[("sex", "F"), "Atelectasis"] == pytest.approx(
        roc_auc_score(labels[sex & ~unlabelled, k], probs[sex & ~unlabelled, k]))
    for column in ("gap", "gap_se", "p_value"):
        assert report.gaps.loc[("sex", "Atelectasis"), column] == pytest.approx(
            labelled.gaps.loc[("sex", "Atelectasis"), column])
    e = FINDINGS.index("Effusion")                # another finding: all of the group's images
    assert report.by_group.loc[("sex", "F"), "Effusion"] == pytest.approx(roc_auc_score(labels[sex, e], probs[sex, e]))
    without = labels.astype(float).copy()
    without[unlabelled, k] = 0                    # absent: what underdiagnosis makes of a missing label
    sick = sex & (without > 0.5).any(axis=1)
    assert report.by_group.loc[("sex", "F"), UNDERDIAGNOSIS] == pytest.approx(
        (~(probs[sick] >= thresholds).any(axis=1)).mean())
