"""Clustered variances (dashboards/clustered_variance.py) against independent computations: Obuchowski's (1997)
formula written out as a direct loop over patients and pairs of images, and a brute-force patient bootstrap of two
groups' AUCs and a proportion on the same patients (variances and covariances)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from statsmodels.stats.weightstats import ttest_ind

from dashboards.clustered_variance import clustered_auc, clustered_proportion, covariance, satterthwaite


def clustered_images(rng: np.random.Generator, patients: int):
    """1-4 images per patient, labels mostly the patient's (prevalence 0.3), scores = label + patient effect +
    noise, rounded (ties)."""
    patient = np.repeat(np.arange(patients), rng.integers(1, 5, patients))
    positive = np.where(rng.random(len(patient)) < 0.8, (rng.random(patients) < 0.3)[patient],
                        rng.random(len(patient)) < 0.3)
    scores = np.round(positive + rng.normal(0, 0.8, patients)[patient] + rng.normal(0, 0.8, len(patient)), 1)
    return patient, positive, scores


def obuchowski_by_loop(patient, positive, scores):
    """Obuchowski 1997, eq. (2)-(5), as written: psi over every (positive, negative) pair."""
    clusters = sorted(set(patient))
    x = {i: scores[(patient == i) & positive] for i in clusters}
    y = {i: scores[(patient == i) & ~positive] for i in clusters}
    n10, n01 = sum(len(v) for v in x.values()), sum(len(v) for v in y.values())
    psi = lambda a, b: 1.0 if a > b else 0.5 if a == b else 0.0
    auc = sum(psi(a, b) for i in clusters for a in x[i] for k in clusters for b in y[k]) / (n10 * n01)
    v10 = {i: sum(psi(a, b) for a in x[i] for k in clusters for b in y[k]) / n01 for i in clusters}
    v01 = {i: sum(psi(a, b) for b in y[i] for k in clusters for a in x[k]) / n10 for i in clusters}
    i10, i01, i11 = (sum(len(x[i]) > 0 for i in clusters), sum(len(y[i]) > 0 for i in clusters), len(clusters))
    s10 = i10 / ((i10 - 1) * n10) * sum((v10[i] - len(x[i]) * auc) ** 2 for i in clusters)
    s01 = i01 / ((i01 - 1) * n01) * sum((v01[i] - len(y[i]) * auc) ** 2 for i in clusters)
    s11 = i11 / (i11 - 1) * sum((v10[i] - len(x[i]) * auc) * (v01[i] - len(y[i]) * auc) for i in clusters)
    return auc, s10 / n10 + s01 / n01 + 2 * s11 / (n10 * n01)


def test_clustered_auc_is_obuchowskis_formula_and_sklearns_auc():
    patient, positive, scores = clustered_images(np.random.default_rng(0), 40)
    estimate = clustered_auc(positive, scores, patient, 40)
    auc, variance = obuchowski_by_loop(patient, positive, scores)
    assert estimate.value == pytest.approx(roc_auc_score(positive, scores)) == pytest.approx(auc)
    assert estimate.variance == pytest.approx(variance, rel=1e-10)
    assert estimate.influence.sum() == pytest.approx(0, abs=1e-12)
    with_positive, with_negative = len(set(patient[positive])), len(set(patient[~positive]))
    assert min(with_positive, with_negative) - 1 <= estimate.df <= with_positive + with_negative - 2  # Satterthwaite


def test_variances_and_covariance_match_a_patient_bootstrap():
    rng = np.random.default_rng(1)
    patients = 300
    patient, positive, scores = clustered_images(rng, patients)
    view = rng.random(len(patient)) < 0.5              # two groups of images sharing patients: correlated AUCs
    missed = scores < 0.5                               # a proportion among the positives
    def estimates(p, pos, s, v, m):
        return [clustered_auc(pos[v], s[v], p[v], patients), clustered_auc(pos[~v], s[~v], p[~v], patients),
                clustered_proportion(m[pos], p[pos], patients)]
    claimed = covariance(estimates(patient, positive, scores, view, missed), patients)
    members = [np.flatnonzero(patient == i) for i in range(patients)]
    def fast_auc(pos, s):                               # Mann-Whitney on mid-ranks (= sklearn's)
        return (rankdata(s)[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())
    resampled = []
    for _ in range(1500):
        rows = np.concatenate([members[i] for i in rng.integers(0, patients, patients)])
        pos, s, v = positive[rows], scores[rows], view[rows]
        resampled.append([fast_auc(pos[v], s[v]), fast_auc(pos[~v], s[~v]), missed[rows][pos].mean()])
    bootstrap = np.cov(np.array(resampled).T)
    scale = np.sqrt(np.outer(np.diag(claimed), np.diag(claimed)))
    print(np.round(claimed / scale, 3), np.round(bootstrap / scale, 3), sep="\n")
    assert np.diag(bootstrap) == pytest.approx(np.diag(claimed), rel=0.15)
    assert np.abs(bootstrap - claimed).max() / scale.max() < 0.1
    assert claimed[0, 1] > 0.05 * scale[0, 1]           # the shared patients make the two AUCs covary


def test_satterthwaite_is_welchs_df():
    rng = np.random.default_rng(2)
    x, y = rng.normal(0, 1, 12), rng.normal(0, 3, 30)
    welch_df = ttest_ind(x, y, usevar="unequal")[2]
    assert satterthwaite((x.var(ddof=1) / 12, 11), (y.var(ddof=1) / 30, 29)) == pytest.approx(welch_df)
    assert np.isnan(satterthwaite((0.0, 5), (0.0, 5))) and np.isnan(satterthwaite((1.0, 0), (1.0, 5)))
