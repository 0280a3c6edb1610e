"""The effect report's files: effects.csv, a forest plot, heatmaps and one HTML page, plus the printed summary.

The same for a sweep read from MLflow and for prediction files (`ablation_report.py --predictions`): both end in
an effects.Analysis and the context that says where it came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from trainable.data.nih import write_atomically

from . import plots
from .effects import (EQUIVALENT, HELPS, HURTS, INCONCLUSIVE, MEAN, NOT_ESTIMABLE, PRIMARY, SECONDARY, Analysis,
                      SeedRounds)
from .evidence import EFFECTS_CSV
from .html_report import HtmlReport

REPORT_HTML = "ablation_report.html"
CALLS = (HELPS, HURTS)


@dataclass(frozen=True)
class ReportContext:
    """Where the predictions came from and how they were analysed."""
    title: str                              # e.g. "sweep abl (parent run …)" or "predictions in DIR"
    baseline: str
    margin: float
    alpha: float
    n_boot: int
    rounds: SeedRounds | None
    thresholds: str                         # where F1 thresholds came from
    factors: Mapping[str, str] = field(default_factory=dict)
    synthetic: bool = False
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReportSection:
    """A part of the report beside the effects (cost, shortcut baselines, subgroup gaps): its own heading, text,
    tables (each also written as a CSV file) and figures (PNG files), and the lines it adds to the summary."""
    heading: str
    paragraphs: tuple[str, ...] = ()
    tables: Mapping[str, pd.DataFrame] = field(default_factory=dict)      # file name -> table
    figures: Mapping[str, object] = field(default_factory=dict)           # file name -> matplotlib Figure
    summary: tuple[str, ...] = ()


def method_lines(ctx: ReportContext) -> list[str]:
    level = f"{ctx.alpha:g}"
    design = ("fixed design: every arm's seeds analysed once" if ctx.rounds is None else
              f"adaptive seeds (--until-decided): looks after {', '.join(map(str, ctx.rounds.looks))} seeds per arm "
              f"(budget {ctx.rounds.max_seeds}); an arm stops getting seeds once its primary verdict is decided. "
              f"Repeated looks are paid for by Lan–DeMets O'Brien–Fleming alpha spending: every p-value below is "
              f"the repeated p-value over the arm's looks")
    return [
        "Δ = arm's mean over seeds − baseline's mean over seeds, on the shared validation split. Var(Δ) = image "
        "noise (paired patient bootstrap, one resample shared by every trial, each trial's metric recomputed "
        f"exactly in each of {ctx.n_boot} replicates) + seed noise of both arms (each arm's seed spread minus the "
        "image noise it already holds, pooled over arms; an arm whose spread is credibly larger than the others' "
        "gets its own, with its own degrees of freedom). Interval and p-values: t reference at those degrees of "
        "freedom.",
        f"Primary family: Δ mean AUC of each arm vs {ctx.baseline!r}, family-wise error ≤ {level} (Holm). "
        f"Secondary family: every per-finding AUC and F1 row and mean F1, false discovery rate ≤ {level} "
        "(Benjamini–Hochberg). Every call listed is an adjusted one (p_adjusted ≤ α).",
        f"Verdicts: helps / hurts (adjusted p ≤ {level}); equivalent (TOST at ±{ctx.margin:g}: the "
        f"{1 - 2 * ctx.alpha:.0%} interval lies inside ±margin, adjusted within the family the same way); "
        "inconclusive (neither: the sweep cannot tell); not estimable (no seed variance, or no positives).",
        "Power: mde = the smallest |Δ| the row would detect with 80% power at the level its family would require "
        f"of it; seeds_to_decide = seeds per arm (and baseline) at which an inconclusive row would be decided at "
        f"±{ctx.margin:g} with 80% power; `python dashboards/plan_sweep.py` plans a sweep from these variances.",
        f"Design: {design}.",
        f"F1 thresholds: {ctx.thresholds} (chosen on these validation labels: optimistic for every arm alike, so Δ "
        "F1 compares fairly, but F1 levels are not test estimates). Details and measured error rates: "
        "dashboards/effects.py, BENCHMARKS.md.",
    ]


def headline(table: pd.DataFrame) -> pd.DataFrame:
    rows = table[table["finding"] == MEAN]
    return rows[["arm", "factor", "metric", "delta", "ci_low", "ci_high", "p_value", "p_adjusted", "verdict", "mde",
                 "seeds_to_decide", "n_seeds", "n_baseline_seeds", "variance", "stopped"]]


def calls(table: pd.DataFrame, family: str, verdicts=CALLS) -> pd.DataFrame:
    rows = table[(table["family"] == family) & table["verdict"].isin(verdicts)]
    return rows[["arm", "finding", "metric", "delta", "ci_low", "ci_high", "p_adjusted", "verdict"]]


def limits(table: pd.DataFrame, ctx: ReportContext) -> list[str]:
    first = table.iloc[0]
    seeds = table.drop_duplicates("arm")[["arm", "n_seeds"]]
    lines = [f"{int(first['n_images'])} validation images from {int(first['n_patients'])} patients; seeds per arm: "
             + ", ".join(f"{r.arm} {r.n_seeds}" for r in seeds.itertuples())
             + f", {ctx.baseline} {int(table['n_baseline_seeds'].max())}."]
    primary = table[table["family"] == PRIMARY]
    estimable = primary[primary["verdict"] != NOT_ESTIMABLE]
    if len(estimable):
        lines.append(f"With these seeds an arm's Δ mean AUC is detectable (80% power, Holm over {len(estimable)}) "
                     f"from about {estimable['mde'].min():.4f} (median {estimable['mde'].median():.4f}); smaller "
                     f"effects are 'inconclusive', not 'no effect'.")
    if table["provisional"].any():
        lines.append("Rows marked provisional (drawn grey): an arm or the baseline has one seed, so its seed "
                     "variance is borrowed from the other arms (assuming it varies like them). Run more seeds "
                     "before acting on them.")
    unstable = sorted(set(table.loc[table["variance"].str.startswith("own"), "arm"]))
    if unstable:
        lines.append(f"Less stable than the others (seed spread credibly larger; judged by their own variance "
                     f"and degrees of freedom): {', '.join(unstable)}.")
    return lines


def write_effect_report(analysis: Analysis, ctx: ReportContext, out: Path,
                        sections: Sequence[ReportSection] = ()) -> tuple[list[Path], str]:
    table = analysis.table.copy()
    table.insert(1, "factor", table["arm"].map(lambda arm: ctx.factors.get(arm, arm)))
    table["stopped"] = table["arm"].map(lambda arm: analysis.stops.get(arm, ""))
    files = [out / EFFECTS_CSV]
    write_atomically(files[0], lambda tmp: table.to_csv(tmp, index=False))
    figures = {"forest_mean_auc.png": plots.forest_plot(table, "auc", confidence=1 - ctx.alpha, margin=ctx.margin),
               "heatmap_auc.png": plots.effect_heatmap(table, "auc"),
               "heatmap_f1.png": plots.effect_heatmap(table, "f1")}
    pngs = {name: plots.png_bytes(fig) for name, fig in figures.items()}
    for name, png in pngs.items():
        write_atomically(out / name, lambda tmp: tmp.write_bytes(png))
        files.append(out / name)
    report = _html(table, ctx, pngs)
    for section in sections:
        files += _write_section(report, section, out)
    files.append(report.write(out / REPORT_HTML))
    return files, "\n".join([_summary(table, ctx), *(line for section in sections for line in ("", *section.summary))])


def _write_section(report: HtmlReport, section: ReportSection, out: Path) -> list[Path]:
    files = []
    report.heading(section.heading)
    for text in section.paragraphs:
        report.paragraph(text)
    for name, fig in section.figures.items():
        png = plots.png_bytes(fig)
        write_atomically(out / name, lambda tmp: tmp.write_bytes(png))
        files.append(out / name)
        report.figure(png, f"{section.heading}: {name}")
    for name, frame in section.tables.items():
        write_atomically(out / name, lambda tmp: frame.to_csv(tmp, index=False))
        files.append(out / name)
        report.table(frame, float_format="{:.4g}")
    return files


def _html(table: pd.DataFrame, ctx: ReportContext, pngs: Mapping[str, bytes]) -> HtmlReport:
    report = HtmlReport(f"Ablation report — {ctx.title}")
    report.paragraph(f"{ctx.title}; each arm compared with the baseline arm {ctx.baseline!r}; margin ±{ctx.margin:g} "
                     f"(mean AUC); α = {ctx.alpha:g}; {ctx.n_boot} bootstrap replicates.")
    if ctx.synthetic:
        report.paragraph("Generated data, not NIH ChestX-ray14: these numbers demonstrate the pipeline only.",
                         warning=True)
    report.heading("How to read it").items(method_lines(ctx)).items(limits(table, ctx))
    report.heading("Primary: Δ mean AUC per arm (Holm)").figure(pngs["forest_mean_auc.png"],
                                                                 "forest plot of Δ mean AUC")
    report.table(headline(table), verdict_column="verdict")
    report.heading("Secondary: Δ per finding (Benjamini–Hochberg)")
    report.figure(pngs["heatmap_auc.png"], "heatmap of Δ AUC per arm and finding")
    report.figure(pngs["heatmap_f1.png"], "heatmap of Δ F1 per arm and finding")
    secondary = calls(table, SECONDARY)
    if len(secondary):
        report.paragraph("Per-finding calls (adjusted p ≤ α):").table(secondary, verdict_column="verdict")
    else:
        report.paragraph("No per-finding call survives the false discovery rate control.")
    equivalent = calls(table, SECONDARY, (EQUIVALENT,))
    if len(equivalent):
        report.paragraph(f"Per-finding rows shown equivalent within ±{ctx.margin:g}:").table(
            equivalent, verdict_column="verdict")
    report.heading("All comparisons").table(table, verdict_column="verdict", collapsed=f"{len(table)} rows "
                                            f"(also in {EFFECTS_CSV})")
    if ctx.notes:
        report.heading("Trials left out").items(list(ctx.notes))
    return report


def _summary(table: pd.DataFrame, ctx: ReportContext) -> str:
    lines = [f"ablation report — {ctx.title}: each arm vs {ctx.baseline!r}, margin ±{ctx.margin:g}, "
             f"α {ctx.alpha:g}",
             "", f"primary (Δ mean AUC, Holm); {1 - ctx.alpha:.0%} interval, adjusted p, smallest detectable Δ:"]
    for row in table[table["family"] == PRIMARY].itertuples():
        extra = []
        if row.provisional:
            extra.append("provisional: one seed, variance borrowed")
        if row.verdict == INCONCLUSIVE:
            extra.append(f"decided at ±{ctx.margin:g} with ~{row.seeds_to_decide:.0f} seeds" if row.seeds_to_decide
                         == row.seeds_to_decide else f"not decidable at ±{ctx.margin:g} by seeds alone")
        if row.stopped:
            extra.append(row.stopped)
        lines.append(f"  {row.arm:<24} Δ {row.delta:+.4f} [{row.ci_low:+.4f}, {row.ci_high:+.4f}]  p_adj "
                     f"{row.p_adjusted:.3g}  seeds {row.n_seeds}/{row.n_baseline_seeds}  mde {row.mde:.4f}  "
                     f"{row.verdict}" + (f"  ({'; '.join(extra)})" if extra else ""))
    secondary = calls(table, SECONDARY)
    n_rows = int((table["family"] == SECONDARY).sum())
    lines += ["", f"secondary calls (per-finding AUC/F1 and mean F1, Benjamini–Hochberg): {len(secondary)} of "
                  f"{n_rows}"]
    lines += [f"  {r.arm} {r.finding} {r.metric.upper()}: Δ {r.delta:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}] "
              f"p_adj {r.p_adjusted:.3g} {r.verdict}" for r in secondary.itertuples()] or ["  none"]
    lines += ["", *method_lines(ctx), *limits(table, ctx)]
    return "\n".join(lines)
