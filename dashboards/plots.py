"""Figures of the effect table: a forest plot of Δ per arm and a heatmap of Δ per arm × finding; importance bars.

Figures are built on matplotlib's object API (no pyplot), so nothing depends on a display or global state.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from trainable.data.nih import write_atomically
from trainable.findings import FINDINGS

from .effects import EQUIVALENT, HELPS, HURTS, MEAN
from .palette import DELTA_CMAP, GREY, VERDICT_COLOURS, verdict_colour

METRIC_LABELS = {"auc": "AUC", "f1": "F1"}
HEATMAP_SCALE = 100      # heatmap cells and their colour bar show Δ × 100 (AUC points)


def forest_plot(effects: pd.DataFrame, metric: str = "auc", finding: str = MEAN, confidence: float = 0.95,
                margin: float | None = None) -> Figure:
    """Δ (mean over findings by default) per arm with its interval; colour = verdict, grey = provisional (a
    one-seed arm's borrowed variance) or not estimable; dotted lines at ±margin."""
    rows = effects[(effects["metric"] == metric) & (effects["finding"] == finding)].iloc[::-1]
    fig = Figure(figsize=(9, 1.2 + 0.45 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    for position, (_, row) in zip(y, rows.iterrows()):
        colour = verdict_colour(row["verdict"], bool(row["provisional"]))
        if np.isfinite(row["ci_low"]) and np.isfinite(row["ci_high"]):
            ax.plot([row["ci_low"], row["ci_high"]], [position, position], color=colour, linewidth=2)
        ax.plot(row["delta"], position, "o", color=colour, markersize=7,
                markerfacecolor="white" if row["provisional"] else colour)
    ax.axvline(0, color="black", linewidth=0.8)
    if margin:
        for side in (-margin, margin):
            ax.axvline(side, color=VERDICT_COLOURS[EQUIVALENT], linewidth=0.8, linestyle=":")
    ax.set_yticks(y, [f"{r.arm}  (seeds {r.n_seeds}/{r.n_baseline_seeds}) {r.verdict}" for r in rows.itertuples()])
    label = "mean over findings" if finding == MEAN else finding
    ax.set_xlabel(f"Δ {METRIC_LABELS.get(metric, metric)} vs baseline ({label}), {confidence:.0%} interval")
    ax.set_title(f"Effect on {METRIC_LABELS.get(metric, metric)} ({label}), verdicts family-adjusted\ngreen helps, "
                 f"red hurts, blue equivalent (dotted: ±margin), orange inconclusive, grey not estimable or "
                 f"provisional (one seed, hollow)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return fig


def effect_heatmap(effects: pd.DataFrame, metric: str = "auc") -> Figure:
    """Δ per arm (rows) × finding (columns, mean first); ▲/▼ mark helps/hurts calls (family-adjusted), = marks
    equivalent; rows of a one-seed arm (provisional) are greyed out."""
    rows = effects[effects["metric"] == metric]
    arms = list(dict.fromkeys(rows["arm"]))
    findings = list(dict.fromkeys(rows["finding"]))
    delta = rows.pivot(index="arm", columns="finding", values="delta").loc[arms, findings].to_numpy(float)
    delta = delta * HEATMAP_SCALE
    verdicts = rows.pivot(index="arm", columns="finding", values="verdict").loc[arms, findings].to_numpy()
    provisional = rows.groupby("arm", sort=False)["provisional"].any().loc[arms].to_numpy()
    limit = np.nanmax(np.abs(delta)) if np.isfinite(delta).any() and np.nanmax(np.abs(delta)) > 0 else 1.0
    fig = Figure(figsize=(1.6 + 0.62 * len(findings), 1.4 + 0.42 * len(arms)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(delta, cmap=DELTA_CMAP, norm=TwoSlopeNorm(0, -limit, limit), aspect="auto")
    for (i, j), value in np.ndenumerate(delta):
        if np.isfinite(value):
            mark = {HELPS: "▲", HURTS: "▼", EQUIVALENT: "="}.get(verdicts[i, j], "")
            colour = GREY if provisional[i] else "white" if abs(value) > 0.6 * limit else "black"
            ax.text(j, i, f"{value:+.1f}{mark}", ha="center", va="center", fontsize=7,
                    fontweight="bold" if mark else "normal", color=colour)
    for i in np.flatnonzero(provisional):
        ax.axhspan(i - 0.5, i + 0.5, color=GREY, alpha=0.6, zorder=2)
    ax.set_xticks(range(len(findings)), findings, rotation=45, ha="right")
    ax.set_yticks(range(len(arms)), arms)
    label = METRIC_LABELS.get(metric, metric)
    fig.colorbar(image, ax=ax, label=f"Δ {label} × {HEATMAP_SCALE} vs baseline")
    ax.set_title(f"Δ {label} × {HEATMAP_SCALE} per arm and finding (▲ helps, ▼ hurts, "
                 f"= equivalent; family-adjusted; grey: one seed)", fontsize=9)
    return fig


def importance_plot(importances: pd.DataFrame) -> Figure:
    """Factor importance (rows: factors, columns: targets) as a heatmap, mean target first."""
    table = importances.pivot(index="param", columns="target", values="importance")
    canonical = [t for t in (MEAN, *FINDINGS) if t in table.columns]
    targets = canonical + [c for c in table.columns if c not in canonical]
    table = table[targets]
    table = table.loc[table[targets[0]].sort_values(ascending=False).index]
    fig = Figure(figsize=(1.8 + 0.6 * len(targets), 1.4 + 0.4 * len(table)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(table.to_numpy(float), cmap="viridis", aspect="auto", vmin=0)
    ax.set_xticks(range(len(targets)), targets, rotation=45, ha="right")
    ax.set_yticks(range(len(table)), table.index)
    fig.colorbar(image, ax=ax, label="importance (PED-ANOVA, normalised per target)")
    ax.set_title("Which factors matter (full-budget trials only)", fontsize=9)
    return fig


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def save_png(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    png = png_bytes(fig)
    write_atomically(path, lambda tmp: tmp.write_bytes(png))
    return path
