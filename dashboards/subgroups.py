"""Subgroups in the final report: per sex, age band and view, each finding's test AUC and the underdiagnosis rate,
with the largest gap between the groups of an attribute, its patient-clustered standard error, Holm decision and CI.

Underdiagnosis (Seyyed-Kalantari et al., Nature Medicine 2021): the false-positive rate of the "No Finding"
decision, i.e. of the images that have at least one finding, the share predicted to have none (no finding's
probability at or above its validation-chosen threshold).

Grouping is fairlearn's MetricFrame, the metrics sklearn's. The gap of an attribute is the difference between
its two groups furthest apart on the test split (highest minus lowest, unknown values apart and never part of a
gap). Its error comes from the groups' clustered variances (dashboards/clustered_variance.py: Obuchowski's for an
AUC, a clustered ratio estimator's for underdiagnosis; covariances where groups share patients, as views do),
with Welch's t (Satterthwaite's df), and is simultaneous over the attribute's pairs of groups (Bonferroni), so it
holds for the pair the data chose. Holm runs over the attribute's 15 metrics (`gap_holm`), and
the CI is at the level that makes it agree with Holm: it excludes 0 exactly when Holm keeps the gap.
benchmarks/subgroup_calibration.py measures the error rates and the power (BENCHMARKS.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame
from scipy.stats import t as student_t
from sklearn.metrics import recall_score, roc_auc_score

from trainable.findings import FINDINGS

from .clustered_variance import Estimate, clustered_auc, clustered_proportion, covariance, satterthwaite
from .multiplicity import multiple_tests
from .tables import markdown_table

UNKNOWN = "unknown"
AGE_BANDS = (0, 20, 40, 60, 80, np.inf)
AGE_LABELS = ("0-20", "20-40", "40-60", "60-80", "80+")
UNDERDIAGNOSIS = "underdiagnosis"
MIN_GROUP_IMAGES = 2          # smaller groups get NaN metrics (and no gap)
# A group's AUC needs this many positive and negative images: with one or two positives its variance is
# meaningless (on generated data, AUCs of 0.1 from two positives "excluded 0").
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


def _sklearn_auc(y: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(y, scores)) if min(y.sum(), len(y) - y.sum()) >= MIN_CLASS_IMAGES else float("nan")


def _auc_of(k: int, labels: np.ndarray, probs: np.ndarray) -> Callable[[np.ndarray, np.ndarray], float]:
    def auc_on(rows: np.ndarray, _unused: np.ndarray) -> float:
        rows = rows[np.isfinite(labels[rows, k])]          # a missing label: the image is not scored on it
        return _sklearn_auc(labels[rows, k] > 0.5, probs[rows, k]) if len(rows) >= MIN_GROUP_IMAGES else float("nan")
    return auc_on


def _underdiagnosis_of(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray
                       ) -> Callable[[np.ndarray, np.ndarray], float]:
    sick = (labels > 0.5).any(axis=1)
    predicted_healthy = ~(probs >= thresholds).any(axis=1)

    def rate(rows: np.ndarray, _unused: np.ndarray) -> float:
        rows = rows[sick[rows]]               # FPR of "No Finding": among those who have a finding
        if len(rows) < MIN_GROUP_IMAGES:
            return float("nan")
        return float(recall_score(np.ones(len(rows), bool), predicted_healthy[rows]))
    return rate


def _metrics(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray
             ) -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    """Metric name -> f(rows, rows): each finding's AUC and the underdiagnosis rate on those image rows (the
    MetricFrame signature y_true, y_pred, fed row numbers so that one call sees all 14 columns)."""
    metrics = {finding: _auc_of(k, labels, probs) for k, finding in enumerate(FINDINGS)}
    metrics[UNDERDIAGNOSIS] = _underdiagnosis_of(labels, probs, thresholds)
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
    gaps: pd.DataFrame           # index (attribute, metric): high, low (groups), gap, gap_se, gap_ci_low,
    #                              gap_ci_high, ci_level, p_value, p_holm, gap_holm


def _gap(table: pd.DataFrame, metric: str) -> tuple[str, str] | None:
    """(highest, lowest) known group on `metric`; two different groups even when all are equal."""
    known = table.loc[[g for g in table.index if g != UNKNOWN], metric].dropna().sort_values(kind="stable")
    if len(known) < 2:
        return None
    return str(known.index[-1]), str(known.index[0])


def _estimate(metric: str, labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, in_group: np.ndarray,
              patients: np.ndarray) -> Estimate:
    """One group's `metric` (a finding's AUC or the underdiagnosis rate) with its clustered variance."""
    n_patients = int(patients.max()) + 1
    if metric == UNDERDIAGNOSIS:
        rows = in_group & (labels > 0.5).any(axis=1)
        return clustered_proportion(~(probs[rows] >= thresholds).any(axis=1), patients[rows], n_patients)
    k = FINDINGS.index(metric)
    in_group = in_group & np.isfinite(labels[:, k])
    return clustered_auc(labels[in_group, k] > 0.5, probs[in_group, k], patients[in_group], n_patients)


def subgroup_report(frame: pd.DataFrame, labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, *,
                    alpha: float = 0.05) -> SubgroupReport:
    """Per attribute and group the metrics; per attribute and metric the largest gap, its standard error from the
    groups' clustered variances (patients of `frame["patient_id"]`), p-value, Holm decision and CI.

    A NaN label (a finding an external set leaves unlabelled on an image, e.g. uncertain under `--uncertain
    ignore`) leaves that image out of that finding's AUC; underdiagnosis counts it as not having the finding."""
    labels, probs, thresholds = np.asarray(labels), np.asarray(probs), np.asarray(thresholds)
    patients = np.unique(frame["patient_id"].astype(str).to_numpy(), return_inverse=True)[1].ravel()
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
        # The gap is the largest of the pairwise differences, so its test and CI are Bonferroni over the k (k - 1) / 2
        # pairs of groups: the interval covers the chosen pair's true gap whichever pair the data chose (for 5
        # groups hardly wider than Tukey's, 2.81 vs 2.73 normal quantiles at 5%, and closer in Holm's tail). Each
        # pair: Welch's t on the clustered variances, Satterthwaite's df, instead of the former patient
        # bootstrap, whose tail (Holm's first step needs p < 0.05 / 15) is noisy at 1000 resamples.
        codes, found = groups.to_numpy(), []
        for metric, (high, low) in pairs.items():
            present = [group for group in table.index if group != UNKNOWN and np.isfinite(table.loc[group, metric])]
            estimates = [_estimate(metric, labels, probs, thresholds, codes == group, patients) for group in present]
            cov = covariance(estimates, int(patients.max()) + 1)
            gap = float(table.loc[high, metric] - table.loc[low, metric])
            h, l = present.index(high), present.index(low)
            se = float(np.sqrt(max(cov[h, h] + cov[l, l] - 2 * cov[h, l], 0.0)))
            df = satterthwaite((cov[h, h], estimates[h].df), (cov[l, l], estimates[l].df))
            pairs_of_groups = len(present) * (len(present) - 1) // 2
            row = {"attribute": attribute, "metric": metric, "high": high, "low": low, "gap": gap, "gap_se": se}
            if not (np.isfinite(cov).all() and np.isfinite(df)):   # no variance: a group's positives (or negatives)
                found.append({**row, "gap_se": np.nan, "p_value": 1.0, "_margin": None})  # are one patient's
                continue
            z = gap / se if se > 0 else (np.inf if gap > 0 else 0.0)
            found.append({**row, "p_value": min(1.0, pairs_of_groups * 2 * float(student_t.sf(z, df))),
                          "_margin": lambda level, df=df, k=pairs_of_groups: float(student_t.isf(level / 2 / k, df))})
        # Holm over the attribute's metrics (14 AUCs + underdiagnosis): a finding's gap counts as real only at a
        # family-wise 5%, so that 15 looks at one attribute do not find a gap by chance. The CI is at the level
        # alpha * p / p_holm (between Holm's first step, 1 - alpha / 15, and 1 - alpha): it excludes 0 exactly
        # when Holm keeps the gap.
        p_values = np.array([row["p_value"] for row in found])
        decided, p_holm = multiple_tests(p_values, alpha=alpha, method="holm")
        for row, real, adjusted in zip(found, decided, p_holm):
            level = alpha * row["p_value"] / adjusted if adjusted > 0 else alpha / len(found)
            margin = np.inf if (of_level := row.pop("_margin")) is None else of_level(level) * row["gap_se"]
            gaps.append({**row, "gap_ci_low": row["gap"] - margin, "gap_ci_high": row["gap"] + margin,
                         "ci_level": 1 - level, "p_holm": float(adjusted), "gap_holm": bool(real)})
    columns = ["attribute", "metric", "high", "low", "gap", "gap_se", "gap_ci_low", "gap_ci_high", "ci_level",
               "p_value", "p_holm", "gap_holm"]
    return SubgroupReport(pd.concat(tables), pd.DataFrame(gaps, columns=columns).set_index(["attribute", "metric"]))


def markdown_section(report: SubgroupReport) -> str:
    by_group = report.by_group.reset_index()
    by_group.index.name = None
    gaps = report.gaps.reset_index()
    lines = ["## Subgroups (test split)", "",
             "Per sex, age band and view: each finding's AUC and the underdiagnosis rate (Seyyed-Kalantari et al. "
             "2021: of the images with a finding, the share predicted to have none at the validation-chosen "
             "thresholds). Gap = highest minus lowest known group; `gap_se`: its standard error from the groups' "
             "patient-clustered variances (Obuchowski 1997 for AUCs); `p_value`: test of no gap between any two "
             "groups of the attribute; `gap_holm`: a gap at a family-wise 5% over the attribute's 15 metrics (Holm, "
             "`p_holm`); CI at level `ci_level` (95% to 99.7%, Holm's level for the gap): it excludes 0 exactly "
             "when `gap_holm`.", "",
             markdown_table(by_group), "", "### Largest gap per attribute", "", markdown_table(gaps), ""]
    return "\n".join(lines) + "\n"


def summary_lines(report: SubgroupReport) -> list[str]:
    """What train_best prints: the gaps a family-wise 5% keeps, per attribute."""
    real = report.gaps[report.gaps["gap_holm"]]
    lines = ["\nsubgroup gaps at a family-wise 5% (Holm over each attribute's metrics; subgroups.csv, "
             "subgroup_gaps.csv):"]
    lines += [f"  {attribute} {metric}: {row['high']} - {row['low']} = {row['gap']:.3f} "
              f"({100 * row['ci_level']:.1f}% CI {row['gap_ci_low']:.3f} to {row['gap_ci_high']:.3f})"
              for (attribute, metric), row in real.iterrows()] or ["  none"]
    return lines
