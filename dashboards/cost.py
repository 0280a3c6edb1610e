"""What each arm costs beside what it gains: the cost table and the plot of Δ mean AUC vs training compute.

Compute is the trials' training FLOPs (trainable/cost.py: 3 x forward FLOPs per image x images trained; the same on
any machine), each arm's median over its seeds; wall time, device-hours, throughput and peak memory are shown
beside it as measured. Following Isensee et al. (2024), an arm's gain is set against what the same compute buys
the baseline: the baseline's mean validation AUC (mean over its seeds, from its per-epoch history in MLflow) at the
epoch where it had spent the arm's compute, minus its final one. Where the arm spent more than the baseline's whole
run, the sweep has no baseline there: the gain is extrapolated as the gain of the baseline's own last stretch of
the same length (learning curves flatten, so this overstates what more compute would buy and errs towards marking
an arm), and `baseline_at_compute` says so; where even that stretch is longer than its run, it is not estimable.
An arm is marked `within_compute_gain` when it gains (Δ mean AUC > 0) no more than that compute-matched gain; an
arm within SAME_COMPUTE of the baseline's compute is compared with the baseline as it is (gain 0).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from trainable.metric_names import (DEVICE_HOURS, FLOPS_PER_IMAGE, PARAM_COUNT, PEAK_GPU_MEMORY_MB, PEAK_RSS_MB,
                                    TRAIN_FLOPS, TRAIN_IMAGES_PER_S, VAL_AUC_MEAN, WALL_SECONDS)

from .effect_report import ReportSection
from .effects import MEAN, PRIMARY
from .plots import verdict_colour
from .sweep_reader import TrialRun

PROBE = VAL_AUC_MEAN
COST_CSV, COST_PNG = "cost.csv", "cost_vs_effect.png"
SAME_COMPUTE = 0.01            # compute ratios this close to 1 (e.g. 3 demographic inputs) are the same budget
MEASURED_COLUMNS = (PARAM_COUNT, FLOPS_PER_IMAGE, TRAIN_FLOPS, TRAIN_IMAGES_PER_S, WALL_SECONDS, DEVICE_HOURS,
                    PEAK_GPU_MEMORY_MB, PEAK_RSS_MB)

History = Callable[[str], Mapping[int, float]]    # run id -> {epoch: val_auc_mean}


def baseline_curve(baseline_trials: Sequence[TrialRun], history: History) -> pd.Series:
    """The baseline's mean validation AUC per epoch, averaged over its seeds (epochs every seed reached)."""
    frame = pd.DataFrame({trial.run_id: pd.Series(history(trial.run_id)) for trial in baseline_trials})
    return frame.dropna().mean(axis=1).sort_index()


def compute_matched_gain(curve: pd.Series, epochs_matched: float) -> tuple[float, str]:
    """What the baseline gains (vs its last epoch) at `epochs_matched` of its epochs' compute, and how it was read."""
    last = int(curve.index.max())
    if not np.isfinite(epochs_matched) or len(curve) == 0:
        return float("nan"), "not estimable"
    if epochs_matched <= last:
        if epochs_matched < curve.index.min():
            return float("nan"), f"not in the sweep (below epoch {curve.index.min()})"
        at = float(np.interp(epochs_matched, curve.index.to_numpy(float), curve.to_numpy(float)))
        return at - float(curve[last]), "measured (baseline history)"
    start = 2 * last - epochs_matched            # the last stretch of the baseline's run as long as the excess
    if start < curve.index.min():
        return float("nan"), f"not in the sweep: run the baseline for {int(np.ceil(epochs_matched))} epochs"
    before = float(np.interp(start, curve.index.to_numpy(float), curve.to_numpy(float)))
    return float(curve[last]) - before, f"extrapolated (gain of its last {epochs_matched - last:.2g} epochs)"


def cost_table(trials: Mapping[str, Sequence[TrialRun]], effects: pd.DataFrame, baseline: str,
               history: History) -> pd.DataFrame:
    """One row per arm (baseline first): medians of the cost metrics over seeds, compute relative to the baseline,
    Δ mean AUC with its interval and verdict, and the compute-matched baseline gain."""
    measured = {arm: {name: float(np.median([t.metrics[name] for t in runs if name in t.metrics]))
                      for name in MEASURED_COLUMNS if any(name in t.metrics for t in runs)}
                for arm, runs in trials.items()}
    if TRAIN_FLOPS not in measured.get(baseline, {}):
        return pd.DataFrame()
    curve = baseline_curve(trials[baseline], history)
    base_flops = measured[baseline][TRAIN_FLOPS]
    base_epochs = int(curve.index.max()) if len(curve) else 0
    primary = effects[(effects["family"] == PRIMARY) & (effects["finding"] == MEAN)].set_index("arm")
    rows = []
    for arm in [baseline, *(a for a in trials if a != baseline)]:
        row = {"arm": arm, "n_trials": len(trials[arm]), **measured[arm]}
        ratio = row.get(TRAIN_FLOPS, np.nan) / base_flops
        row["compute_vs_baseline"] = ratio
        if DEVICE_HOURS in row and DEVICE_HOURS in measured[baseline]:
            row["device_hours_vs_baseline"] = row[DEVICE_HOURS] / measured[baseline][DEVICE_HOURS]
        if arm != baseline and arm in primary.index:
            effect = primary.loc[arm]
            gain, source = ((0.0, f"same compute (within {SAME_COMPUTE:.0%})") if abs(ratio - 1) <= SAME_COMPUTE
                            else compute_matched_gain(curve, ratio * base_epochs))
            row.update(delta_mean_auc=effect["delta"], ci_low=effect["ci_low"], ci_high=effect["ci_high"],
                       verdict=effect["verdict"], baseline_epochs_at_compute=ratio * base_epochs,
                       compute_matched_gain=gain, baseline_at_compute=source,
                       within_compute_gain=bool(0 < effect["delta"] <= gain) if np.isfinite(gain) else None)
        rows.append(row)
    return pd.DataFrame(rows)


def cost_plot(table: pd.DataFrame, curve: pd.Series | None = None) -> Figure:
    """Δ mean AUC (interval, colour = verdict) vs training compute relative to the baseline, log scale; the
    baseline's own curve (its earlier epochs, relative to its last) drawn through (1, 0); arms whose gain the
    same compute would buy the baseline are drawn hollow."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    if curve is not None and len(curve):
        last = curve.index.max()
        ax.plot(curve.index / last, curve - curve[last], "-s", color="black", markersize=4, linewidth=1,
                label="baseline at fewer epochs (its history)")
    ax.plot([1], [0], "s", color="black", markersize=7)
    arms = table.dropna(subset=["delta_mean_auc"]) if "delta_mean_auc" in table else table.iloc[:0]
    for row in arms.itertuples():
        colour = verdict_colour(row.verdict)
        ax.plot([row.compute_vs_baseline] * 2, [row.ci_low, row.ci_high], color=colour, linewidth=2)
        within = row.within_compute_gain is True
        ax.plot(row.compute_vs_baseline, row.delta_mean_auc, "o", color=colour, markersize=8,
                markerfacecolor="white" if within else colour)
        ax.annotate(row.arm, (row.compute_vs_baseline, row.delta_mean_auc), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ratio = FuncFormatter(lambda value, _: f"×{value:g}")
    ax.xaxis.set_major_formatter(ratio)
    ax.xaxis.set_minor_formatter(ratio)
    ax.set_xlabel("training compute vs baseline (FLOPs, median over seeds; log scale)")
    ax.set_ylabel("Δ mean AUC vs baseline (interval)")
    ax.set_title("Gain vs compute: hollow = no more than the baseline gains from the same compute")
    if curve is not None and len(curve):
        ax.legend(loc="best", fontsize=8)
    return fig


def cost_section(trials: Mapping[str, Sequence[TrialRun]], effects: pd.DataFrame, baseline: str,
                 history: History) -> ReportSection:
    heading = "Cost of each modification"
    table = cost_table(trials, effects, baseline, history)
    if table.empty:
        return ReportSection(heading, ("The baseline's trials logged no cost metrics (a sweep run before they "
                                       "existed): no cost table.",), summary=("cost: no cost metrics logged",))
    curve = baseline_curve(trials[baseline], history)
    marked = table.loc[table.get("within_compute_gain", pd.Series(dtype=object)) == True, "arm"]  # noqa: E712
    text = (f"Per arm, medians over seeds of what its trials logged; compute = {TRAIN_FLOPS} (3 × forward FLOPs per "
            f"image × images trained). {PEAK_RSS_MB} is the trial process's peak resident set on the CPU, "
            f"{PEAK_GPU_MEMORY_MB} torch.cuda.max_memory_allocated on a GPU. compute_matched_gain: what the baseline "
            "gains (its mean val AUC at the arm's compute minus at its last epoch; dashboards/cost.py); "
            "within_compute_gain: 0 < Δ mean AUC ≤ that gain, i.e. the same compute spent on the baseline buys as "
            "much.")
    summary = ["cost (median over seeds; compute = training FLOPs vs baseline; gain the baseline gets from it):"]
    for row in table.itertuples():
        line = f"  {row.arm:<24} compute ×{row.compute_vs_baseline:.3g}"
        if DEVICE_HOURS in table:
            line += f"  {getattr(row, DEVICE_HOURS):.3g} device-h"
        if getattr(row, "delta_mean_auc", np.nan) == getattr(row, "delta_mean_auc", np.nan):
            line += (f"  Δ mean AUC {row.delta_mean_auc:+.4f}  compute-matched baseline gain "
                     f"{row.compute_matched_gain:+.4f} ({row.baseline_at_compute})"
                     + ("  WITHIN COMPUTE GAIN" if row.within_compute_gain is True else ""))
        summary.append(line)
    paragraphs = [text, ("Arms whose gain the same compute would buy the baseline: " + ", ".join(marked) + "."
                         if len(marked) else "No arm's gain is within what the same compute buys the baseline.")]
    return ReportSection(heading, tuple(paragraphs), {COST_CSV: table}, {COST_PNG: cost_plot(table, curve)},
                         tuple(summary))
