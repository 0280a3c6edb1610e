"""Variances of group metrics when images cluster within patients: the AUC's after Obuchowski (Biometrics 1997,
"Nonparametric analysis of clustered ROC curve data", the clustered DeLong variance) and a proportion's as a
clustered ratio estimator, each with its per-patient influence so that two groups sharing patients (PA and AP
images of one patient) get their covariance as well.

No well-kept library computes the clustered DeLong variance (scikit-learn and statsmodels have none); the patient
bootstrap it replaces in the subgroup gaps came out too narrow in benchmarks/subgroup_calibration.py, and its tails
(Holm's first step needs a p-value of 0.05 / 15) cost thousands of resamples.

Influence: the metric's estimate minus its value is, to first order, the sum over patients of `influence`, so
Var = sum(influence**2) and Cov(a, b) = sum(a.influence * b.influence), each with a small-sample factor n / (n - 1).
`df` says how well the variance itself is known (few patients with a positive: few degrees of freedom), for
Student-t rather than normal quantiles: in benchmarks/subgroup_calibration.py normal quantiles let 17% of null
simulations keep an age gap (Holm's first step lies in the tail, where an estimated variance matters most).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata


@dataclass(frozen=True)
class Estimate:
    value: float
    variance: float
    influence: np.ndarray          # (patients,): each patient's first-order contribution to value's error
    df: float                      # degrees of freedom of `variance` (Satterthwaite, from its patients' counts)


def _factor(clusters: int) -> float:
    return clusters / (clusters - 1) if clusters > 1 else np.nan


def clustered_auc(positive: np.ndarray, scores: np.ndarray, patient: np.ndarray, n_patients: int) -> Estimate:
    """ROC AUC (ties count one half) with Obuchowski's variance. `patient`: each image's patient number in
    range(n_patients). Per positive image V10 = share of negatives scored below it, per negative V01 = share of
    positives scored above it (DeLong's components, from mid-ranks); summed per patient they give
        S10 = I10 / (I10 - 1) / N10 * sum_i (V10_i - m_i AUC)**2   (I10 patients with a positive, m_i of them)
        S01 = I01 / (I01 - 1) / N01 * sum_i (V01_i - n_i AUC)**2   (I01 patients with a negative, n_i of them)
        S11 = I / (I - 1) * sum_i (V10_i - m_i AUC) (V01_i - n_i AUC)
        Var = S10 / N10 + S01 / N01 + 2 S11 / (N10 N01)
    (N10, N01: the positive and negative images, I: the patients with either)."""
    positive = np.asarray(positive, bool)
    n10, n01 = int(positive.sum()), int((~positive).sum())
    ranks = rankdata(scores)
    v10 = (ranks[positive] - rankdata(scores[positive])) / n01
    v01 = 1 - (ranks[~positive] - rankdata(scores[~positive])) / n10
    auc = float(v10.mean())
    m = np.bincount(patient[positive], minlength=n_patients)
    n = np.bincount(patient[~positive], minlength=n_patients)
    a = np.bincount(patient[positive], v10, minlength=n_patients) - m * auc
    b = np.bincount(patient[~positive], v01, minlength=n_patients) - n * auc
    i10, i01 = int((m > 0).sum()), int((n > 0).sum())
    s10, s01 = _factor(i10) * (a ** 2).sum() / n10 ** 2, _factor(i01) * (b ** 2).sum() / n01 ** 2
    variance = s10 + s01 + 2 * _factor(int(((m + n) > 0).sum())) * (a * b).sum() / (n10 * n01)
    return Estimate(auc, float(variance), a / n10 + b / n01, satterthwaite((s10, i10 - 1), (s01, i01 - 1)))


def clustered_proportion(hits: np.ndarray, patient: np.ndarray, n_patients: int) -> Estimate:
    """Share of `hits` among the images given, with the clustered (ratio-estimator) variance
    I / (I - 1) * sum_i ((hits_i - n_i p) / N)**2 over the I patients with an image."""
    hits = np.asarray(hits, np.float64)
    share = float(hits.mean())
    count = np.bincount(patient, minlength=n_patients)
    influence = (np.bincount(patient, hits, minlength=n_patients) - count * share) / len(hits)
    patients = int((count > 0).sum())
    return Estimate(share, float(_factor(patients) * (influence ** 2).sum()), influence, float(patients - 1))


def satterthwaite(*parts: tuple[float, float]) -> float:
    """Degrees of freedom of a sum of independent variance estimates, each (variance, its df); NaN where a part
    has no degree of freedom or none has a variance."""
    if any(not np.isfinite(v) or (v > 0 and df <= 0) for v, df in parts):
        return float("nan")
    spread = sum(float(v) ** 2 / df for v, df in parts if v > 0)
    return float(sum(float(v) for v, _ in parts) ** 2 / spread) if spread > 0 else float("nan")


def covariance(estimates: list[Estimate], n_patients: int) -> np.ndarray:
    """(k, k) covariance of k estimates on the same patients: their own variances on the diagonal, the influences'
    cross-products (n / (n - 1)) off it; zero between groups of different patients."""
    influence = np.stack([estimate.influence for estimate in estimates])
    matrix = _factor(n_patients) * influence @ influence.T
    np.fill_diagonal(matrix, [estimate.variance for estimate in estimates])
    return matrix
