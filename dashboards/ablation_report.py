"""Ablation report: which modification helps which finding, with intervals -- read back from a sweep in MLflow.

    python dashboards/ablation_report.py --sweep NAME_OR_PARENT_RUN_ID [--mlflow-uri URI] [--out DIR]

An ablation sweep gets Δ mean AUC, Δ per-finding AUC and F1 of every arm vs the baseline with 95% intervals
(paired bootstrap over patients, combined over seeds with the seed-to-seed variance folded in; see
dashboards/effects.py) and a verdict per arm and finding. A search sweep gets factor importance and direction
from its full-budget trials, and the command that re-runs its top configurations properly.
Files go to --out (default reports/<sweep>) and are logged on the sweep's parent run under `<kind>_report/`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as `python dashboards/ablation_report.py`, installed or not: import the project from the repo root,
    # and keep this folder off the path (its module names would shadow nothing, but stay unambiguous).
    HERE, ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
    sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != HERE)]

import pandas as pd  # noqa: E402

from search_spaces import BASELINE_ARM  # noqa: E402
from trainable.data.nih import write_atomically  # noqa: E402
from trainable.errors import UserError  # noqa: E402

from dashboards import effects as fx  # noqa: E402
from dashboards import importance as imp  # noqa: E402
from dashboards import plots  # noqa: E402
from dashboards.evidence import EFFECTS_CSV  # noqa: E402
from dashboards.html_report import HtmlReport  # noqa: E402
from dashboards.sweep_reader import (Sweep, ablation_trials, connect, default_tracking_uri,  # noqa: E402
                                     load_arm_predictions, open_sweep)

REPORT_HTML = "ablation_report.html"
METHOD = ("Δ = arm's mean over seeds − baseline's mean over seeds, on the shared validation split. Interval: "
          "paired bootstrap over patients (the same resample for every trial of every arm; each trial's metric "
          "recomputed in each resample and averaged over its arm's seeds), widened by the seed-to-seed variance "
          "of both arms (each arm's own or the variance pooled over arms, whichever is larger) with a t quantile "
          "at the pooled seed degrees of freedom. Verdict: helps / hurts when the interval excludes 0, else no "
          "detectable effect. F1 uses each trial's own validation-chosen thresholds: optimistic for both arms "
          "alike. Details and measured error rates: dashboards/effects.py.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, help="the sweep: its parent run id or its MLflow experiment name")
    parser.add_argument("--mlflow-uri", default=None,
                        help="tracking store (default: MLFLOW_TRACKING_URI, else runs/mlflow.db as the sweeps write)")
    parser.add_argument("--out", default=None, help="output folder (default: reports/<sweep>)")
    parser.add_argument("--baseline", default=BASELINE_ARM,
                        help="arm the others are compared with (default: %(default)s)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default: %(default)s)")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval level (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: %(default)s)")
    parser.add_argument("--no-log", action="store_true", help="write the files only; log nothing to MLflow")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")     # one bar per downloaded file
    uri = default_tracking_uri(args.mlflow_uri)
    client = connect(uri)
    sweep = open_sweep(client, args.sweep, uri)
    out = Path(args.out) if args.out else Path("reports") / sweep.experiment_name
    out.mkdir(parents=True, exist_ok=True)
    if sweep.kind == "search":
        files, summary = search_report(sweep, out)
    else:
        files, summary = ablation_report(client, sweep, out, args)
    print(summary)
    if sweep.notes:
        print("\nnotes:\n  " + "\n  ".join(sweep.notes))
    print(f"\nfiles in {out}: {', '.join(f.name for f in files)}")
    if not args.no_log:
        for path in files:
            client.log_artifact(sweep.parent_run_id, str(path), artifact_path=f"{sweep.kind}_report")
        client.set_tag(sweep.parent_run_id, f"{sweep.kind}_report", f"{sweep.kind}_report/{files[-1].name}")
        print(f"logged on parent run {sweep.parent_run_id} under {sweep.kind}_report/")
    return 0


# --- ablation sweeps ----------------------------------------------------------------------------------------

def ablation_report(client, sweep: Sweep, out: Path, args: argparse.Namespace) -> tuple[list[Path], str]:
    trials = ablation_trials(sweep)
    if args.baseline not in trials:
        raise UserError(f"sweep {sweep.name}: no finished trial of the baseline arm {args.baseline!r} "
                        f"(arms with finished trials: {', '.join(trials) or 'none'})")
    predictions = load_arm_predictions(client, trials)
    table = fx.estimate_effects(predictions, args.baseline, n_boot=args.n_boot, confidence=args.confidence,
                                seed=args.seed)
    factors = {arm: runs[0].tags.get("factor", arm) for arm, runs in trials.items()}
    table.insert(1, "factor", table["arm"].map(factors))
    files = [out / EFFECTS_CSV]
    write_atomically(files[0], lambda tmp: table.to_csv(tmp, index=False))

    figures = {"forest_mean_auc.png": plots.forest_plot(table, "auc", confidence=args.confidence),
               "heatmap_auc.png": plots.effect_heatmap(table, "auc"),
               "heatmap_f1.png": plots.effect_heatmap(table, "f1")}
    pngs = {name: plots.png_bytes(fig) for name, fig in figures.items()}
    for name, png in pngs.items():
        write_atomically(out / name, lambda tmp: tmp.write_bytes(png))
        files.append(out / name)
    files.append(_ablation_html(sweep, table, pngs, args).write(out / REPORT_HTML))
    return files, _ablation_summary(sweep, table, args)


def _headline(table: pd.DataFrame) -> pd.DataFrame:
    rows = table[(table["finding"] == fx.MEAN)]
    return rows[["arm", "factor", "metric", "arm_value", "delta", "ci_low", "ci_high", "seed_sd", "baseline_seed_sd",
                 "n_seeds", "n_baseline_seeds", "verdict", "provisional"]]


def _calls(table: pd.DataFrame) -> pd.DataFrame:
    flagged = table[(table["finding"] != fx.MEAN) & table["verdict"].isin([fx.HELPS, fx.HURTS])]
    return flagged[["arm", "finding", "metric", "delta", "ci_low", "ci_high", "verdict", "provisional"]]


def _limits(table: pd.DataFrame, confidence: float) -> list[str]:
    first = table.iloc[0]
    seeds = table.drop_duplicates("arm")[["arm", "n_seeds"]]
    lines = [f"{int(first['n_images'])} validation images from {int(first['n_patients'])} patients; seeds per "
             f"arm: " + ", ".join(f"{r.arm} {r.n_seeds}" for r in seeds.itertuples())
             + f", baseline {int(first['n_baseline_seeds'])}; pooled seed degrees of freedom: {first['df']:g}.",
             f"{len(table)} comparisons at {confidence:.0%}: if no arm changed anything, up to about "
             f"{fx.expected_false_calls(table, confidence):.0f} of them would still be flagged by chance. Treat an "
             f"isolated per-finding call with care; the mean AUC is the primary comparison."]
    if table["provisional"].any():
        lines.append("Provisional rows: an arm or the baseline has one seed, so its seed-to-seed variance cannot "
                     "be estimated (borrowed from other arms where they have several seeds, otherwise left out, "
                     "which makes the interval too narrow). Run more seeds before acting on them.")
    return lines


def _ablation_html(sweep: Sweep, table: pd.DataFrame, pngs: dict[str, bytes], args) -> HtmlReport:
    report = HtmlReport(f"Ablation report — {sweep.name}")
    data = sweep.parent_tags.get("data", "?")
    report.paragraph(f"Sweep {sweep.name} (parent run {sweep.parent_run_id}); data: {data}, fingerprint "
                     f"{sweep.parent_tags.get('data_fingerprint', '?')}; baseline arm: {args.baseline}; "
                     f"{args.n_boot} bootstrap replicates.")
    if data == "SYNTHETIC":
        report.paragraph("Generated data, not NIH ChestX-ray14: these numbers demonstrate the pipeline only.",
                         warning=True)
    report.heading("How to read it").paragraph(METHOD).items(_limits(table, args.confidence))
    report.heading("Δ mean AUC per arm").figure(pngs["forest_mean_auc.png"], "forest plot of Δ mean AUC")
    report.table(_headline(table), verdict_column="verdict")
    report.heading("Δ per finding").figure(pngs["heatmap_auc.png"], "heatmap of Δ AUC per arm and finding")
    report.figure(pngs["heatmap_f1.png"], "heatmap of Δ F1 per arm and finding")
    calls = _calls(table)
    if len(calls):
        report.paragraph("Per-finding intervals that exclude 0:").table(calls, verdict_column="verdict")
    else:
        report.paragraph("No per-finding interval excludes 0.")
    report.heading("All comparisons").table(table, verdict_column="verdict", collapsed=f"{len(table)} rows "
                                            f"(also in {EFFECTS_CSV})")
    if sweep.notes:
        report.heading("Trials left out").items(sweep.notes)
    return report


def _ablation_summary(sweep: Sweep, table: pd.DataFrame, args) -> str:
    head = _headline(table)
    lines = [f"ablation report — {sweep.name} (baseline {args.baseline}); Δ vs baseline, "
             f"{args.confidence:.0%} interval", ""]
    for row in head.itertuples():
        mark = " (provisional)" if row.provisional else ""
        lines.append(f"  {row.arm:<24} mean {row.metric.upper():<3} Δ {row.delta:+.4f} "
                     f"[{row.ci_low:+.4f}, {row.ci_high:+.4f}]  seeds {row.n_seeds}/{row.n_baseline_seeds}  "
                     f"{row.verdict}{mark}")
    calls = _calls(table)
    lines += ["", f"per-finding calls ({len(calls)} of {int((table['finding'] != fx.MEAN).sum())}):"]
    lines += [f"  {r.arm} {r.finding} {r.metric.upper()}: Δ {r.delta:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}] "
              f"{r.verdict}" for r in calls.itertuples()] or ["  none"]
    lines += ["", *_limits(table, args.confidence)]
    return "\n".join(lines)


# --- search sweeps ------------------------------------------------------------------------------------------

def search_report(sweep: Sweep, out: Path) -> tuple[list[Path], str]:
    space = imp.searched_space(sweep)
    finished = imp.full_budget_trials(sweep)
    pruned = sum(t.pruned for t in sweep.trials)
    report = HtmlReport(f"Search report — {sweep.name}")
    files: list[Path] = []
    lines = [f"search report — {sweep.name}: {len(sweep.trials)} trials, {len(finished)} ran the full budget, "
             f"{pruned} stopped early by ASHA (left out)"]
    report.paragraph(lines[0])
    warning = ("These are single-seed, single-split numbers from trials that survived ASHA, which keeps what "
               "converges fast; fast is not better at the end. No claim can rest on them: re-run the top "
               "configurations at full budget with several seeds (an ablation against the baseline), then read "
               "that sweep's ablation report.")
    report.paragraph(warning, warning=True)
    if len(finished) < imp.MIN_TRIALS:
        lines.append(f"fewer than {imp.MIN_TRIALS} full-budget trials: no importance computed")
        report.paragraph(lines[-1])
    else:
        importances, notes = imp.factor_importance(imp.build_study(finished, space))
        if len(finished) < imp.FEW_TRIALS:
            notes.insert(0, f"only {len(finished)} full-budget trials: importance rankings are noisy at this size "
                            f"(PED-ANOVA contrasts the top {imp.top_quantile(len(finished)):.0%} of them with the "
                            f"rest); read them as hints")
        directions = imp.factor_directions(finished, space)
        for name, frame in (("importance.csv", importances), ("factor_directions.csv", directions)):
            write_atomically(out / name, lambda tmp: frame.to_csv(tmp, index=False))
            files.append(out / name)
        mean_importance = importances[importances["target"] == fx.MEAN].drop(columns="target")
        lines += ["", "importance for mean AUC (PED-ANOVA, full-budget trials; noise floor = 95th percentile of the "
                      "raw importance with outcomes shuffled):"]
        lines += [f"  {r.param:<22} {r.importance:.3f}  raw {r.raw_importance:.4f} vs floor {r.noise_floor:.4f}"
                  f"{'  above noise' if r.above_noise is True else ''}" for r in mean_importance.itertuples()]
        report.heading("Factor importance (mean AUC)").paragraph(
            "importance: PED-ANOVA share (normalised); a factor is above noise when its raw importance exceeds the "
            "95th percentile it reaches when the trials' outcomes are shuffled (40 shuffles). A categorical "
            "factor's effect can show on the conditional factors it switches on (loss=focal on focal_gamma): read "
            "importance together with the direction table below.")
        report.table(mean_importance, float_format="{:.4f}")
        if len(importances):
            png = plots.png_bytes(plots.importance_plot(importances))
            write_atomically(out / "importance.png", lambda tmp: tmp.write_bytes(png))
            files.append(out / "importance.png")
            report.heading("Importance per finding").figure(png, "factor importance per finding")
        report.items(notes)
        lines += [f"note: {note}" for note in notes]
        lines += ["", "direction: the best group of each factor (mean final val AUC vs all full-budget trials):"]
        best = directions.loc[directions.groupby("param", sort=False)["mean_val_auc"].idxmax()]
        lines += [f"  {r.param:<22} {r.group:<26} {r.vs_all_trials:+.4f} ({r.n_trials} trials)"
                  for r in best.itertuples()]
        report.heading("Direction: mean final val AUC per category or tertile").table(directions)
    top = imp.top_trials(finished)
    if top:
        arms = imp.rerun_arms(top, imp.fixed_keys(sweep))
        arms_file = imp.write_rerun_arms(arms, top, out / "rerun_top_configs.yaml")
        files.append(arms_file)
        command = imp.rerun_command(sweep, arms_file, [BASELINE_ARM, *arms])
        report.heading("Next step: re-run the top configurations").paragraph(warning, warning=True).code(command)
        lines += ["", warning, "", "re-run the top configurations with:", f"  {command}"]
    files.append(report.write(out / "search_report.html"))
    return files, "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
