"""Subgroup gaps of an ablation: does an arm widen or narrow the gap between patient groups, vs the baseline?

Groups from the validation metadata the sweep logged (dashboards/shortcuts.py): sex, age band and view, as the
final report groups them (dashboards/subgroups.ATTRIBUTES; unknown values apart, never part of a gap). Per trial
and attribute, two gaps = largest − smallest value over its groups:
  mean AUC            the mean over findings of each group's per-finding AUC
  underdiagnosis      Seyyed-Kalantari et al. (2021): the false-positive rate of the "No Finding" decision, i.e.
                      the share of a group's images with a finding where every probability is below the trial's own
                      (validation-chosen) threshold
A group with fewer than MIN_GROUP_SICK images with a finding is left out (its rates would be noise).

Δ gap (arm − baseline) is analysed like the report's secondary rows (dashboards/effects.py): the same paired patient
bootstrap (every trial's gap recomputed in every replicate, from the same draws), the same seed-variance model
(dashboards/variance.py), t intervals at its degrees of freedom, and Benjamini–Hochberg over these rows (a family of
their own at the same α). A negative Δ narrows the gap. Per-group values are fairlearn MetricFrames (sklearn's
roc_auc_score per group), the bootstrap's point estimates equal them (tests/test_ablation_report.py).
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame
from matplotlib.figure import Figure
from scipy import stats
from sklearn.metrics import roc_auc_score

from .effect_report import ReportSection
from trainable.errors import DataError

from .effects import (DEFAULT_ALPHA, DEFAULT_MARGIN, HELPS, HURTS, TrialPredictions, t_tests, align_trials,
                      bootstrap_counts, decide_family, patient_groups, resampled_metrics)
from .plots import verdict_colour
from .shortcuts import ARTIFACT_FOLDER, VAL_METADATA_CSV
from .subgroups import ATTRIBUTES, UNKNOWN
from .variance import delta_variance, seed_model

MIN_GROUP_SICK = 10
GAP_METRICS = ("mean_auc", "underdiagnosis")
WIDENS, NARROWS = "widens", "narrows"
GAPS_CSV, GROUPS_CSV, GAPS_PNG = "subgroup_gaps.csv", "subgroup_values.csv", "subgroup_gaps.png"


def subgroups(metadata: pd.DataFrame) -> dict[str, np.ndarray]:
    """attribute -> group label per image, as the final report groups them (dashboards/subgroups.py)."""
    return {attribute: group_of(metadata).to_numpy(str) for attribute, group_of in ATTRIBUTES.items()}


def _kept_groups(labels: np.ndarray, groups: np.ndarray) -> list[str]:
    sick = labels.any(axis=1)
    return [g for g in sorted(set(groups)) if g != UNKNOWN and sick[groups == g].sum() >= MIN_GROUP_SICK]


def group_values(trials: Sequence[TrialPredictions], labels: np.ndarray, groups: np.ndarray, kept: Sequence[str],
                 counts: np.ndarray) -> dict[str, np.ndarray]:
    """{metric: (T, B, groups)} mean AUC and underdiagnosis rate of every trial in every replicate (a column of
    `counts`), per group."""
    sick = labels.any(axis=1)
    missed_by_trial = [sick & (np.asarray(t.probs) < np.asarray(t.thresholds)).all(axis=1) for t in trials]
    mean_auc, under = [], []
    for group in kept:
        masked = counts * (groups == group)[:, None]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)          # a finding without positives in the group
            mean_auc.append(np.nanmean(resampled_metrics(trials, masked)["auc"], axis=-1))
        sick_counts = (masked * sick[:, None]).sum(axis=0).astype(float)                  # (B,)
        missed = np.stack([(masked * missed[:, None]).sum(axis=0) for missed in missed_by_trial])   # (T, B)
        with np.errstate(invalid="ignore", divide="ignore"):
            under.append(np.where(sick_counts > 0, missed / sick_counts, np.nan))
    return {"mean_auc": np.stack(mean_auc, axis=-1), "underdiagnosis": np.stack(under, axis=-1)}


def _gap(values: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmax(values, axis=-1) - np.nanmin(values, axis=-1)


def metric_frame(trial: TrialPredictions, groups: np.ndarray, kept: Sequence[str]) -> pd.DataFrame:
    """One trial's per-group mean AUC and underdiagnosis rate, by fairlearn's MetricFrame over sklearn metrics."""
    labels, probs = np.asarray(trial.labels) > 0.5, np.asarray(trial.probs)
    keep = np.isin(groups, kept)

    def mean_auc(y_true, y_pred):
        aucs = [roc_auc_score(y_true[:, k], y_pred[:, k]) for k in range(y_true.shape[1])
                if 0 < y_true[:, k].sum() < len(y_true)]
        return float(np.mean(aucs)) if aucs else float("nan")

    def underdiagnosis(y_true, y_pred):
        sick = y_true.any(axis=1)
        return float((y_pred[sick] < trial.thresholds).all(axis=1).mean()) if sick.any() else float("nan")

    frame = MetricFrame(metrics={"mean_auc": mean_auc, "underdiagnosis": underdiagnosis}, y_true=labels[keep],
                        y_pred=probs[keep], sensitive_features=pd.Series(groups[keep], name="group"))
    return frame.by_group


def gap_rows(arms: Mapping[str, Sequence[TrialPredictions]], baseline: str, metadata: pd.DataFrame, *,
             n_boot: int = 1000, alpha: float = DEFAULT_ALPHA, margin: float = DEFAULT_MARGIN,
             seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(Δ gap rows per arm × attribute × metric with interval, adjusted p and verdict; per-group values of every arm,
    mean over seeds)."""
    reference = arms[baseline][0]
    arms = align_trials(arms, reference)
    order = pd.Index(metadata["image"].astype(str)).get_indexer(np.asarray(reference.images).astype(str))
    if (order < 0).any():
        raise DataError(f"{ARTIFACT_FOLDER}/{VAL_METADATA_CSV} on the parent run lacks validation image "
                        f"{np.asarray(reference.images)[order < 0][0]} of the trials; expected the sweep's own split")
    metadata = metadata.iloc[order].reset_index(drop=True)
    trials = [t for ts in arms.values() for t in ts]
    arm_of = np.repeat(list(arms), [len(ts) for ts in arms.values()])
    labels = np.asarray(reference.labels) > 0.5
    counts = np.column_stack([np.ones(len(labels), np.uint16),
                              bootstrap_counts(patient_groups(reference.images, len(labels)), n_boot, seed)])
    columns, gaps, group_tables = [], [], []
    for attribute, groups in subgroups(metadata).items():
        kept = _kept_groups(labels, groups)
        if len(kept) < 2:
            continue
        values = group_values(trials, labels, groups, kept, counts)
        for metric in GAP_METRICS:
            columns.append((attribute, metric))
            gaps.append(_gap(values[metric]))                                     # (T, B + 1)
            per_group = pd.DataFrame(values[metric][:, 0], columns=kept).assign(arm=arm_of).groupby("arm").mean()
            group_tables.append(per_group.reset_index().melt(id_vars="arm", var_name="group", value_name="value")
                                .assign(attribute=attribute, metric=metric))
    if not columns:                          # no attribute with two groups big enough (a small validation split)
        return pd.DataFrame(), pd.DataFrame()
    gaps = np.stack(gaps, axis=-1)                                                  # (T, B + 1, G)
    point = {arm: gaps[arm_of == arm, 0] for arm in arms}
    replicates = {arm: gaps[arm_of == arm, 1:] for arm in arms}
    model = seed_model(point, replicates, seed=seed)
    rows = []
    for arm in arms:
        if arm == baseline:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            v_img = np.nanvar(replicates[arm].mean(axis=0) - replicates[baseline].mean(axis=0), axis=0, ddof=1)
        variance = delta_variance(model, arm, baseline, v_img)
        delta = point[arm].mean(axis=0) - point[baseline].mean(axis=0)
        se = np.sqrt(variance.total)
        p_up, p_down, p_equivalence = t_tests(delta, se, variance.df, margin)
        for g, (attribute, metric) in enumerate(columns):
            rows.append({"arm": arm, "attribute": attribute, "metric": metric,
                         "arm_gap": point[arm][:, g].mean(), "baseline_gap": point[baseline][:, g].mean(),
                         "delta": delta[g], "se": se[g], "df": variance.df[g],
                         "p_value": min(1.0, 2 * min(p_up[g], p_down[g])) if np.isfinite(p_up[g]) else np.nan,
                         "direction": 1 if p_up[g] <= p_down[g] else -1, "p_equivalence": p_equivalence[g],
                         "n_seeds": len(point[arm]), "n_baseline_seeds": len(point[baseline])})
    table = pd.DataFrame(rows)
    if len(table):
        quantile = stats.t.ppf(1 - alpha / 2, table["df"].to_numpy(float))
        table["ci_low"] = table["delta"] - quantile * table["se"]
        table["ci_high"] = table["delta"] + quantile * table["se"]
        decide_family(table, "fdr_bh", alpha)
        # a call on a gap says which way the gap moved, not whether the arm "helps"
        called = table["verdict"].isin([HELPS, HURTS])
        table.loc[called, "verdict"] = np.where(table.loc[called, "delta"] > 0, WIDENS, NARROWS)
        table = table.drop(columns=["direction"])
    return table, pd.concat(group_tables, ignore_index=True) if group_tables else pd.DataFrame()


def gap_plot(table: pd.DataFrame, confidence: float) -> Figure:
    """Per arm (one panel each), Δ gap vs the baseline with its interval per attribute and metric; colour =
    verdict; left of 0 narrows the gap."""
    arms = list(dict.fromkeys(table["arm"]))
    fig = Figure(figsize=(8, 1.0 + 2.2 * len(arms)), layout="constrained")
    for i, arm in enumerate(arms):
        ax = fig.add_subplot(len(arms), 1, i + 1)
        rows = table[table["arm"] == arm].iloc[::-1]
        y = np.arange(len(rows))
        for position, row in zip(y, rows.itertuples()):
            colour = verdict_colour({WIDENS: HURTS, NARROWS: HELPS}.get(row.verdict, row.verdict))
            ax.plot([row.ci_low, row.ci_high], [position, position], color=colour, linewidth=2)
            ax.plot(row.delta, position, "o", color=colour)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(y, [f"{r.attribute} {r.metric.replace('_', ' ')} gap (baseline {r.baseline_gap:.3f})"
                          for r in rows.itertuples()])
        ax.set_title(f"{arm}: Δ subgroup gap vs baseline, {confidence:.0%} interval (< 0 narrows it)", fontsize=9)
    return fig


def gap_section(arms: Mapping[str, Sequence[TrialPredictions]], baseline: str, metadata: pd.DataFrame | None, *,
                n_boot: int = 1000, alpha: float = DEFAULT_ALPHA, margin: float = DEFAULT_MARGIN,
                seed: int = 0) -> ReportSection:
    heading = "Subgroup gaps: Δ vs the baseline (Benjamini–Hochberg)"
    if metadata is None:
        return ReportSection(heading, ("The sweep logged no validation metadata (run before it existed): no "
                                       "subgroup gaps.",), summary=("subgroup gaps: no validation metadata logged",))
    table, values = gap_rows(arms, baseline, metadata, n_boot=n_boot, alpha=alpha, margin=margin, seed=seed)
    if table.empty:
        return ReportSection(heading, (f"No attribute has two groups with ≥ {MIN_GROUP_SICK} images with a "
                                       "finding: no gaps.",), summary=("subgroup gaps: too few images per group",))
    text = ("gap = largest − smallest value over an attribute's groups (sex; age bands 0–20, 20–40, 40–60, "
            f"60–80, 80+, unknown apart; view), groups with ≥ {MIN_GROUP_SICK} images with a finding; mean_auc: "
            "mean per-finding AUC in the group; underdiagnosis: share of the group's images with a finding where every "
            "probability is below the trial's threshold (Seyyed-Kalantari et al. 2021). Δ = arm − baseline, "
            "intervals and p-values as the secondary rows (paired patient bootstrap + seed variance, t), "
            f"Benjamini–Hochberg over these {len(table)} rows at α = {alpha:g}. Δ < 0 narrows the gap.")
    calls = table[table["verdict"].isin([WIDENS, NARROWS])]
    summary = [f"subgroup gaps (Δ arm − baseline, Benjamini–Hochberg over {len(table)} rows; < 0 narrows):"]
    summary += [f"  {r.arm:<24} {r.attribute:<5} {r.metric:<15} gap {r.arm_gap:.3f} vs {r.baseline_gap:.3f}  "
                f"Δ {r.delta:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]  p_adj {r.p_adjusted:.3g}"
                + (f"  {WIDENS.upper() if r.delta > 0 else NARROWS.upper()}" if r.Index in calls.index else "")
                for r in table.itertuples()]
    return ReportSection(heading, (text,), {GAPS_CSV: table, GROUPS_CSV: values},
                         {GAPS_PNG: gap_plot(table, 1 - alpha)}, tuple(summary))
