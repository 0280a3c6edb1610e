"""Subgroups in the final report: per sex, age band and view, each finding's test AUC and the underdiagnosis rate,
with the largest gap between the groups of an attribute and its patient-clustered bootstrap 95% CI.

Underdiagnosis (Seyyed-Kalantari et al., Nature Medicine 2021): the false-positive rate of the "No Finding"
decision, i.e. of the images that have at least one finding, the share predicted to have none (no finding's
probability at or above its validation-chosen threshold).

Grouping is fairlearn's MetricFrame, the metrics sklearn's. The gap of an attribute is the difference between
its two groups furthest apart on the test split (highest minus lowest, unknown values apart and never part of a
gap); its CI resamples whole patients and is simultaneous over the attribute's pairs of groups (Tukey-style, from
the range of the groups' resampled deviations), so it holds for the pair the data chose: a CI above 0 says the
ordering of those two groups is not resampling noise. `gap_holm` adds Holm over the attribute's 15 metrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame
from scipy.stats import rankdata
from sklearn.metrics import recall_score, roc_auc_score
from statsmodels.stats.multitest import multipletests

from trainable.findings import FINDINGS

from .tables import markdown_table

UNKNOWN = "unknown"
AGE_BANDS = (0, 20, 40, 60, 80, np.inf)
AGE_LABELS = ("0-20", "20-40", "40-60", "60-80", "80+")
UNDERDIAGNOSIS = "underdiagnosis"
MIN_GROUP_IMAGES = 2          # smaller groups get NaN metrics (and no gap)
# A group's AUC needs this many positive and negative images: with one or two positives the percentile
# bootstrap of a gap is degenerate (on generated data, AUCs of 0.1 from two positives "excluded 0").
MIN_CLASS_IMAGES = 5


def _age_band(frame: pd.DataFrame) -> pd.Series:
    bands = pd.cut(frame["age"], bins=list(AGE_BANDS), labels=list(AGE_LABELS), right=False)
    return bands.astype(object).where(bands.notna(), UNKNOWN)


def _known(values: pd.Series, allowed: tuple[str, ...]) -> pd.Series:
    return values.where(values.isin(allowed), UNKNOWN)


# Attribute -> its group per image of a metadata table (the columns of an NIH or external split).
ATTRIBUTES: dict[str, Callable[[pd.DataFrame], pd.Series]] = {
    "sex": lambda frame: _known(frame["sex"].astype(str), ("M", "F")),
    "age": _age_band,
    "view": lambda frame: _known(frame["view"].astype(str), ("PA", "AP")),
}


def rank_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic on average ranks: the value of sklearn's roc_auc_score (ties count
    one half; tests/test_subgroups.py checks it), about 50 times faster on small groups, where sklearn's input
    checks dominate: the bootstrap calls it 2 x 15 x 3 times per resample."""
    positives = int(y.sum())
    negatives = len(y) - positives
    if min(positives, negatives) < MIN_CLASS_IMAGES:
        return float("nan")
    return float((rankdata(scores)[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _resampled_auc(y: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """rank_auc of each resample at once: resample b holds image i weights[b, i] times, (resamples, images) ->
    (resamples,). Per resample: each positive's weight times the weight of the negatives scored below it (ties
    count one half), over the product of the classes' weights; NaN where a class has < MIN_CLASS_IMAGES."""
    order = np.argsort(scores, kind="stable")
    y, scores, weights = y[order], scores[order], weights[:, order]
    starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])           # blocks of tied scores
    block = np.cumsum(np.r_[True, scores[1:] != scores[:-1]]) - 1
    negatives = np.add.reduceat(weights * ~y, starts, axis=1)                   # (resamples, blocks)
    credit = np.cumsum(negatives, axis=1) - negatives / 2                       # below + half of the ties
    positives_weight, negatives_weight = (weights * y).sum(axis=1), negatives.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (weights[:, y] * credit[:, block[y]]).sum(axis=1) / (positives_weight * negatives_weight)
    return np.where(np.minimum(positives_weight, negatives_weight) >= MIN_CLASS_IMAGES, auc, np.nan)


def _resampled_metric(metric: str, labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray,
                      in_group: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One group's `metric` (a finding's AUC or the underdiagnosis rate) in every resample, (resamples,)."""
    if metric == UNDERDIAGNOSIS:
        rows = in_group & (labels > 0.5).any(axis=1)
        missed = ~(probs[rows] >= thresholds).any(axis=1)
        sick = weights[:, rows].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(sick >= MIN_GROUP_IMAGES, weights[:, rows] @ missed / sick, np.nan)
    k = FINDINGS.index(metric)
    return _resampled_auc(labels[in_group, k] > 0.5, probs[in_group, k], weights[:, in_group])


def _sklearn_auc(y: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(y, scores)) if min(y.sum(), len(y) - y.sum()) >= MIN_CLASS_IMAGES else float("nan")


def _auc_of(k: int, labels: np.ndarray, probs: np.ndarray, auc: Callable[[np.ndarray, np.ndarray], float]
            ) -> Callable[[np.ndarray, np.ndarray], float]:
    def auc_on(rows: np.ndarray, _unused: np.ndarray) -> float:
        return auc(labels[rows, k] > 0.5, probs[rows, k]) if len(rows) >= MIN_GROUP_IMAGES else float("nan")
    return auc_on


def _underdiagnosis_of(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, fast: bool
                       ) -> Callable[[np.ndarray, np.ndarray], float]:
    sick = (labels > 0.5).any(axis=1)
    predicted_healthy = ~(probs >= thresholds).any(axis=1)

    def rate(rows: np.ndarray, _unused: np.ndarray) -> float:
        rows = rows[sick[rows]]               # FPR of "No Finding": among those who have a finding
        if len(rows) < MIN_GROUP_IMAGES:
            return float("nan")
        if fast:                              # the same share, without recall_score's input checks
            return float(predicted_healthy[rows].mean())
        return float(recall_score(np.ones(len(rows), bool), predicted_healthy[rows]))
    return rate


def _metrics(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, *, fast: bool = False
             ) -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    """Metric name -> f(rows, rows): each finding's AUC and the underdiagnosis rate on those image rows (the
    MetricFrame signature y_true, y_pred, fed row numbers so that one call sees all 14 columns). `fast`: the
    same values without sklearn's per-call overhead, for the bootstrap."""
    auc = rank_auc if fast else _sklearn_auc
    metrics = {finding: _auc_of(k, labels, probs, auc) for k, finding in enumerate(FINDINGS)}
    metrics[UNDERDIAGNOSIS] = _underdiagnosis_of(labels, probs, thresholds, fast)
    return metrics


def group_metrics(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, groups: pd.Series
                  ) -> pd.DataFrame:
    """(groups, 14 findings + underdiagnosis), grouped by fairlearn's MetricFrame."""
    rows = np.arange(len(labels))
    frame = MetricFrame(metrics=_metrics(labels, probs, thresholds), y_true=rows, y_pred=rows,
                        sensitive_features=pd.Series(groups.to_numpy(), name="group"))
    return frame.by_group


@dataclass
class SubgroupReport:
    by_group: pd.DataFrame       # index (attribute, group): images, patients, each finding's AUC, underdiagnosis
    gaps: pd.DataFrame           # index (attribute, metric): high, low (groups), gap, gap_ci_low, gap_ci_high,
    #                              p_value, gap_holm


def _gap(table: pd.DataFrame, metric: str) -> tuple[str, str] | None:
    """(highest, lowest) known group on `metric`; two different groups even when all are equal."""
    known = table.loc[[g for g in table.index if g != UNKNOWN], metric].dropna().sort_values(kind="stable")
    if len(known) < 2:
        return None
    return str(known.index[-1]), str(known.index[0])


def subgroup_report(frame: pd.DataFrame, labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, *,
                    n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> SubgroupReport:
    """Per attribute and group the metrics; per attribute and metric the largest gap with its bootstrap CI
    (patients of `frame["patient_id"]` resampled with replacement)."""
    labels, probs, thresholds = np.asarray(labels), np.asarray(probs), np.asarray(thresholds)
    patients = np.unique(frame["patient_id"].astype(str).to_numpy(), return_inverse=True)[1].ravel()
    n_patients = int(patients.max()) + 1
    rng = np.random.default_rng(seed)
    # resample b holds image i weights[b, i] times: its patient's count among n_patients draws with replacement
    draws = rng.integers(0, n_patients, (n_boot, n_patients))
    weights = np.stack([np.bincount(row, minlength=n_patients) for row in draws])[:, patients].astype(np.float64)
    tables, gaps = [], []
    for attribute, of in ATTRIBUTES.items():
        groups = of(frame)
        table = group_metrics(labels, probs, thresholds, groups)
        counts = pd.DataFrame({"images": groups.value_counts(),
                               "patients": pd.Series(patients).groupby(groups.to_numpy()).nunique()})
        tables.append(pd.concat({attribute: counts.join(table)}, names=["attribute", "group"]))
        pairs = {metric: _gap(table, metric) for metric in table.columns}
        pairs = {metric: pair for metric, pair in pairs.items() if pair is not None}
        if not pairs:
            continue
        # Tukey-style simultaneous intervals: in each resample every known group's deviation from its own estimate,
        # and the range of those deviations; its 1 - alpha quantile q bounds every pairwise difference's error at
        # once, so [gap - q, gap + q] covers the chosen pair's true gap whichever pair the data chose, and
        # p = share of resampled ranges >= the gap. (A percentile interval of the chosen pair's resampled gap is
        # centred on a maximum: in 3 null simulations of benchmarks/subgroup_calibration.py 13-20% of its age and
        # view CIs lay above 0.)
        # A resample is a patient-count vector, so all resamples of a group's metric are computed at once
        # (_resampled_metric); a MetricFrame per resample costs about 50 times more (pandas' groupby-apply).
        codes = groups.to_numpy()
        known = [group for group in table.index if group != UNKNOWN]
        estimate = table.loc[known, list(pairs)].to_numpy(np.float64)        # (groups, metrics)
        again = np.stack([np.column_stack([_resampled_metric(metric, labels, probs, thresholds, codes == group,
                                                             weights) for metric in pairs])
                          for group in known])                               # (groups, resamples, metrics)
        deviation = again - estimate[:, None, :]
        present = np.isfinite(deviation)
        spread = np.where(present, deviation, -np.inf).max(axis=0) - np.where(present, deviation, np.inf).min(axis=0)
        ranges = np.where(present.sum(axis=0) >= 2, spread, np.nan)           # (resamples, metrics)
        found = []
        for j, (metric, (high, low)) in enumerate(pairs.items()):
            finite = ranges[:, j][np.isfinite(ranges[:, j])]
            gap = table.loc[high, metric] - table.loc[low, metric]
            margin = np.quantile(finite, 1 - alpha) if len(finite) else np.nan
            found.append({"attribute": attribute, "metric": metric, "high": high, "low": low, "gap": gap,
                          "gap_ci_low": gap - margin, "gap_ci_high": gap + margin,
                          "p_value": float((finite >= gap).mean()) if len(finite) else 1.0})
        # Holm over the attribute's metrics (14 AUCs + underdiagnosis): a finding's gap counts as real only at a
        # family-wise 5%, so that 15 looks at one attribute do not find a gap by chance
        decided = multipletests([row["p_value"] for row in found], alpha=alpha, method="holm")[0]
        gaps += [{**row, "gap_holm": bool(real)} for row, real in zip(found, decided)]
    columns = ["attribute", "metric", "high", "low", "gap", "gap_ci_low", "gap_ci_high", "p_value", "gap_holm"]
    return SubgroupReport(pd.concat(tables), pd.DataFrame(gaps, columns=columns).set_index(["attribute", "metric"]))


def markdown_section(report: SubgroupReport) -> str:
    by_group = report.by_group.reset_index()
    by_group.index.name = None
    gaps = report.gaps.reset_index()
    lines = ["## Subgroups (test split)", "",
             "Per sex, age band and view: each finding's AUC and the underdiagnosis rate (Seyyed-Kalantari et al. "
             "2021: of the images with a finding, the share predicted to have none at the validation-chosen "
             "thresholds). Gap = highest minus lowest known group; 95% CI: bootstrap over patients; "
             "`p_value`: bootstrap test of no gap; `gap_holm`: a gap at a family-wise 5% over the attribute's 15 "
             "metrics (Holm).", "",
             markdown_table(by_group), "", "### Largest gap per attribute", "", markdown_table(gaps), ""]
    return "\n".join(lines) + "\n"


def summary_lines(report: SubgroupReport) -> list[str]:
    """What train_best prints: the gaps a family-wise 5% keeps, per attribute."""
    real = report.gaps[report.gaps["gap_holm"]]
    lines = ["\nsubgroup gaps at a family-wise 5% (Holm over each attribute's metrics; subgroups.csv, "
             "subgroup_gaps.csv):"]
    lines += [f"  {attribute} {metric}: {row['high']} - {row['low']} = {row['gap']:.3f} "
              f"(95% CI {row['gap_ci_low']:.3f} to {row['gap_ci_high']:.3f})"
              for (attribute, metric), row in real.iterrows()] or ["  none"]
    return lines
