"""Ablation report: which modification helps which finding, with controlled error rates -- read back from a sweep in
MLflow, or from prediction files made anywhere.

    python dashboards/ablation_report.py --sweep NAME_OR_PARENT_RUN_ID [--mlflow-uri URI] [--out DIR]
    python dashboards/ablation_report.py --predictions DIR [--baseline NAME] [--out DIR]

An ablation sweep gets Δ mean AUC (the primary family: Holm), Δ per-finding AUC and F1 (the secondary family:
Benjamini–Hochberg) of every arm vs the baseline, each with its interval, raw and adjusted p-values, one of five
verdicts (helps / hurts / equivalent within ±--margin / inconclusive / not estimable) and the smallest effect
it could have detected (see dashboards/effects.py). A sweep run with --until-decided is analysed with its
sequential rule. A search sweep gets factor importance and direction from its full-budget trials, and the
command that re-runs its top configurations properly.
--predictions reads DIR/<arm>/seed<k>.csv (columns image, patient, label_<F>, prob_<F> for the 14 findings;
see dashboards/predictions.py) and needs no MLflow. Files go to --out (default reports/<sweep or DIR name>); a
sweep's are also logged on its parent run under `<kind>_report/`.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":
    # Run as `python dashboards/ablation_report.py`, installed or not: import the project from the repo root,
    # and keep this folder off the path (its module names would shadow nothing, but stay unambiguous).
    HERE, ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
    sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != HERE)]

from search_spaces import BASELINE_ARM  # noqa: E402
from trainable.data.nih import write_atomically  # noqa: E402
from trainable.errors import UserError, exit_promptly  # noqa: E402

from dashboards import effects as fx  # noqa: E402
from dashboards.cost import PROBE, cost_section  # noqa: E402
from dashboards.shortcuts import ARTIFACT_FOLDER as SHORTCUT_FOLDER  # noqa: E402
from dashboards.shortcuts import read_shortcut_inputs, shortcut_section  # noqa: E402
from dashboards.subgroup_gaps import gap_section  # noqa: E402
from dashboards import importance as imp  # noqa: E402
from dashboards import plots  # noqa: E402
from dashboards.effect_report import ReportContext, write_effect_report  # noqa: E402
from dashboards.html_report import HtmlReport  # noqa: E402
from dashboards.mlflow_store import connect  # noqa: E402
from dashboards.predictions import read_predictions  # noqa: E402
from dashboards.sweep_reader import (SweepResults, ablation_trials, default_tracking_uri,  # noqa: E402
                                     load_arm_predictions, open_sweep, sweep_rounds)
from dashboards.tables import text_table  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sweep", help="the sweep: its parent run id or its MLflow experiment name")
    source.add_argument("--predictions", metavar="DIR",
                        help="prediction files DIR/<arm>/seed<k>.csv instead of a sweep (no MLflow)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="tracking store (default: MLFLOW_TRACKING_URI, else runs/mlflow.db as the sweeps write)")
    parser.add_argument("--out", default=None, help="output folder (default: reports/<sweep or DIR name>)")
    parser.add_argument("--baseline", default=BASELINE_ARM,
                        help="arm the others are compared with (default: %(default)s)")
    parser.add_argument("--margin", type=float, default=None,
                        help=f"equivalence margin on Δ (default: the sweep's --margin, else {fx.DEFAULT_MARGIN})")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default: %(default)s)")
    parser.add_argument("--confidence", type=float, default=1 - fx.DEFAULT_ALPHA,
                        help="interval level; α = 1 − confidence is every family's error rate "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: %(default)s)")
    parser.add_argument("--no-log", action="store_true", help="write the files only; log nothing to MLflow")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not 0 < args.confidence < 1:
            raise UserError(f"--confidence {args.confidence}: expected a number in (0, 1)")
        if args.margin is not None and not args.margin > 0:
            raise UserError(f"--margin {args.margin}: expected a number > 0")
        return run_predictions(args) if args.predictions else run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run_predictions(args: argparse.Namespace) -> int:
    found = read_predictions(args.predictions)
    out = Path(args.out) if args.out else Path("reports") / Path(args.predictions).resolve().name
    if args.baseline not in found.arms:
        raise UserError(f"--predictions {args.predictions}: no folder for the baseline arm {args.baseline!r} "
                        f"(arms: {', '.join(found.arms)}); pass --baseline")
    out.mkdir(parents=True, exist_ok=True)
    analysis, ctx = analyse(found.arms, args, title=f"predictions in {args.predictions}", groups=found.patients,
                            thresholds="; ".join(f"{arm}: {source}" for arm, source in found.threshold_sources.items()))
    files, summary = write_effect_report(analysis, ctx, out)
    print(summary)
    print(f"\nfiles in {out}: {', '.join(f.name for f in files)}")
    return 0


def analyse(predictions, args: argparse.Namespace, *, title: str, groups=None, thresholds: str,
            rounds: fx.SeedRounds | None = None, margin: float | None = None,
            **context) -> tuple[fx.Analysis, ReportContext]:
    """The effect analysis as the command line asks for it; `margin` is the sweep's, used unless --margin."""
    margin = args.margin if args.margin is not None else margin if margin is not None else fx.DEFAULT_MARGIN
    alpha = 1 - args.confidence
    resampled = fx.resample(predictions, args.baseline, n_boot=args.n_boot, seed=args.seed, groups=groups)
    analysis = fx.analyse(resampled, args.baseline, margin=margin, alpha=alpha, rounds=rounds, seed=args.seed)
    ctx = ReportContext(title=title, baseline=args.baseline, margin=margin, alpha=alpha, n_boot=args.n_boot,
                        rounds=rounds, thresholds=thresholds, **context)
    return analysis, ctx


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")     # one bar per downloaded file
    uri = default_tracking_uri(args.mlflow_uri)
    client = connect(uri, create=False)
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

def ablation_report(client, sweep: SweepResults, out: Path, args: argparse.Namespace) -> tuple[list[Path], str]:
    trials = ablation_trials(sweep)
    if args.baseline not in trials:
        raise UserError(f"sweep {sweep.name}: no finished trial of the baseline arm {args.baseline!r} "
                        f"(arms with finished trials: {', '.join(trials) or 'none'})")
    rounds, margin = sweep_rounds(sweep)
    predictions = load_arm_predictions(client, trials)
    analysis, ctx = analyse(
        predictions, args, rounds=rounds, margin=margin,
        title=f"sweep {sweep.name} (parent run {sweep.parent_run_id}; data {sweep.parent_tags.get('data', '?')}, "
              f"fingerprint {sweep.parent_tags.get('data_fingerprint', '?')})",
        thresholds="each trial's own, chosen on the validation labels it was trained against (thresholds.json)",
        factors={arm: runs[0].tags.get("factor", arm) for arm, runs in trials.items()},
        synthetic=sweep.parent_tags.get("data") == "SYNTHETIC", notes=tuple(sweep.notes))

    def history(run_id: str) -> dict[int, float]:          # the baseline's per-epoch curve (dashboards/cost.py)
        return {metric.step: metric.value for metric in client.get_metric_history(run_id, PROBE)}
    with tempfile.TemporaryDirectory(prefix="ablation-report-") as scratch:
        metadata_model, val_metadata = read_shortcut_inputs(download_parent_folder(client, sweep, SHORTCUT_FOLDER,
                                                                                    Path(scratch)))
    sections = [cost_section(trials, analysis.table, args.baseline, history),
                shortcut_section(predictions, args.baseline, metadata_model, n_boot=args.n_boot, alpha=ctx.alpha,
                                 seed=args.seed),
                gap_section(predictions, args.baseline, val_metadata, n_boot=args.n_boot, alpha=ctx.alpha,
                            margin=ctx.margin, seed=args.seed)]
    return write_effect_report(analysis, ctx, out, sections)


def download_parent_folder(client, sweep: SweepResults, folder: str, target: Path) -> Path:
    """The parent run's artifact folder `folder`, downloaded into `target` (absent where the sweep logged none)."""
    if any(Path(a.path).name == folder for a in client.list_artifacts(sweep.parent_run_id)):
        client.download_artifacts(sweep.parent_run_id, folder, str(target))
    return target / folder


# --- search sweeps ------------------------------------------------------------------------------------------

def search_report(sweep: SweepResults, out: Path) -> tuple[list[Path], str]:
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
        shown = mean_importance[["param", "importance", "raw_importance", "noise_floor"]].assign(
            above_noise=["above noise" if above is True else "" for above in mean_importance["above_noise"]])
        lines.append(text_table(shown, {"importance": "{:.3f}".format, "raw_importance": "{:.4f}".format,
                                        "noise_floor": "{:.4f}".format}))
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
        lines.append(text_table(best[["param", "group", "vs_all_trials", "n_trials"]],
                                {"vs_all_trials": "{:+.4f}".format}))
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
    exit_promptly(main())
