"""Plan an ablation from a pilot: how many seeds per arm to detect a given Δ mean AUC, and what it costs.

    python dashboards/plan_sweep.py --from-sweep NAME_OR_PARENT_RUN_ID --detect 0.01 [--mlflow-uri URI]
    python dashboards/plan_sweep.py --predictions DIR --detect 0.01 --epoch-seconds 600 --epochs 10

The pilot's variances (dashboards/variance.py: seed variance pooled over arms, each model's image noise, the
image noise common to an arm's seeds) are projected to k seeds per arm (arm and baseline alike), and k is the
smallest number at which a true |Δ mean AUC| = --detect would be called with 80% power in the primary family
(Holm over the planned arms: its first step, α/m). The baseline runs as many seeds as the arm that needs the
most. Compute = trials × epochs × the pilot's measured seconds per epoch (its trials' `epoch_seconds`, training
plus validation; for older sweeps their run time / epochs) × the resources per trial: GPU-hours when the pilot
ran with --gpus-per-trial, else CPU-hours.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__":
    HERE, ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
    sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != HERE)]

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from search_spaces import BASELINE_ARM  # noqa: E402
from trainable.errors import UserError  # noqa: E402

from dashboards import effects as fx  # noqa: E402
from dashboards.power import MAX_SEEDS, seeds_needed  # noqa: E402
from dashboards.predictions import read_predictions  # noqa: E402
from dashboards.sweep_reader import (ablation_trials, connect, default_tracking_uri, load_arm_predictions,  # noqa: E402
                                     open_sweep, parent_param)
from dashboards.tables import text_table  # noqa: E402

EPOCH_SECONDS = "epoch_seconds"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-sweep", metavar="NAME", help="the pilot sweep: parent run id or experiment name")
    source.add_argument("--predictions", metavar="DIR", help="pilot prediction files DIR/<arm>/seed<k>.csv")
    parser.add_argument("--detect", type=float, required=True, help="the Δ mean AUC to detect, e.g. 0.01")
    parser.add_argument("--mlflow-uri", default=None, help="tracking store (default: as ablation_report.py)")
    parser.add_argument("--baseline", default=BASELINE_ARM, help="(default: %(default)s)")
    parser.add_argument("--arms", type=int, default=None,
                        help="arms to compare with the baseline in the planned sweep (default: the pilot's)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: the pilot's)")
    parser.add_argument("--epoch-seconds", type=float, default=None,
                        help="seconds per epoch (default: measured in the pilot's trials)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=fx.DEFAULT_ALPHA, help="family-wise error (default: 0.05)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not 0 < args.detect < 1:
            raise UserError(f"--detect {args.detect}: expected a Δ mean AUC in (0, 1), e.g. 0.01")
        if args.arms is not None and args.arms < 1:
            raise UserError(f"--arms {args.arms}: expected at least 1")
        print(plan(args))
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def plan(args: argparse.Namespace) -> str:
    if args.predictions:
        found = read_predictions(args.predictions)
        predictions, groups, cost = found.arms, found.patients, Cost(args.epoch_seconds, args.epochs, 1.0, "CPU")
        source = f"pilot predictions in {args.predictions}"
    else:
        uri = default_tracking_uri(args.mlflow_uri)
        client = connect(uri)
        sweep = open_sweep(client, args.from_sweep, uri)
        trials = ablation_trials(sweep)
        if args.baseline not in trials:
            raise UserError(f"sweep {sweep.name}: no finished trial of the baseline arm {args.baseline!r}")
        predictions, groups, cost = load_arm_predictions(client, trials), None, Cost.of_sweep(sweep, trials, args)
        source = f"pilot sweep {sweep.name} (parent run {sweep.parent_run_id})"
    if args.baseline not in predictions:
        raise UserError(f"no predictions of the baseline arm {args.baseline!r} (arms: {', '.join(predictions)})")
    resampled = fx.resample(predictions, args.baseline, n_boot=args.n_boot, groups=groups)
    look = fx.analyse_look(resampled, args.baseline)
    model = look.models["auc"]
    if not np.isfinite(model.pooled_sample).any() and not any(s.unstable for s in model.arms.values()):
        raise UserError(f"{source}: no arm has two seeds, so the seed variance is unknown; a pilot needs at least "
                        f"2 seeds in some arms")
    compared = [arm for arm in predictions if arm != args.baseline]
    m = args.arms or len(compared)
    level = args.alpha / m
    head = look.table[(look.table["finding"] == fx.MEAN) & (look.table["metric"] == "auc")].set_index("arm")
    needed = {arm: seeds_needed(model, arm, args.baseline, look.image_variance[(arm, "auc")], args.detect, level,
                                decide=False)[0] for arm in compared}
    lines = [f"plan from {source}: detect |Δ mean AUC| >= {args.detect:g} with 80% power, Holm over {m} arm(s) "
             f"(first step α/m = {level:.4g}), α = {args.alpha:g}", ""]
    pilot = head.loc[compared]
    table = pd.DataFrame({"arm": compared, "pilot seeds": pilot["n_seeds"].astype(int).to_numpy(),
                          "seed sd": pilot["seed_sd"].to_numpy(), "se now": pilot["se"].to_numpy(),
                          "seeds per arm needed": [f"{needed[arm]:.0f}" if np.isfinite(needed[arm])
                                                   else f"> {MAX_SEEDS} (image noise)" for arm in compared],
                          "variance": pilot["variance"].to_numpy()})
    lines.append(text_table(table, {"seed sd": "{:.4f}".format, "se now": "{:.4f}".format}))
    finite = [n for n in needed.values() if np.isfinite(n)]
    if not finite:
        lines += ["", f"no number of seeds up to {MAX_SEEDS} detects {args.detect:g}: the validation set's image noise "
                      "alone is too large; use more validation images or a larger --detect"]
        return "\n".join(lines)
    typical = int(np.median(finite))
    # the planned arms: the pilot's, or --arms of them each like the median pilot arm
    seeds = ([int(n) for n in finite] if args.arms is None else [typical] * m)
    trials = sum(seeds) + max(seeds)
    lines += ["", f"planned sweep: {m} arm(s) with {', '.join(map(str, seeds)) if args.arms is None else typical} "
                  f"seeds each, baseline {max(seeds)} seeds: {trials} trials"]
    lines.append(cost.describe(trials))
    lines += [f"run it as:  python sweeps/run_ablation.py --seeds {max(seeds)} ...   or adaptively, stopping arms "
              f"once decided:  python sweeps/run_ablation.py --seeds {min(3, max(seeds))} --max-seeds {max(seeds)} "
              f"--until-decided ..."]
    return "\n".join(lines)


class Cost:
    """Seconds per epoch, epochs and resources per trial of the planned sweep, and their unit."""

    def __init__(self, epoch_seconds: float | None, epochs: int | None, per_trial: float, unit: str,
                 how: str = "given"):
        self.epoch_seconds, self.epochs, self.per_trial = epoch_seconds, epochs, per_trial
        self.unit, self.how = unit, how

    @classmethod
    def of_sweep(cls, sweep, trials, args: argparse.Namespace) -> "Cost":
        runs = [run for runs in trials.values() for run in runs]
        epochs = args.epochs or int(float(parent_param(sweep, "epochs", 0)) or 0) or None
        measured = [run.metrics[EPOCH_SECONDS] for run in runs if EPOCH_SECONDS in run.metrics]
        how = f"median {EPOCH_SECONDS} of {len(measured)} pilot trials"
        if not measured and epochs:
            pilot_epochs = int(float(parent_param(sweep, "epochs", epochs)))
            measured = [(run.end_time - run.start_time) / 1000 / pilot_epochs for run in runs
                        if run.end_time > run.start_time]
            how = f"pilot trials' run time / {pilot_epochs} epochs (they report no {EPOCH_SECONDS})"
        gpus = float(parent_param(sweep, "gpus_per_trial", 0) or 0)
        cpus = float(parent_param(sweep, "cpus_per_trial", 1) or 1)
        seconds = args.epoch_seconds or (float(np.median(measured)) if measured else None)
        return cls(seconds, epochs, gpus if gpus > 0 else cpus, "GPU" if gpus > 0 else "CPU",
                   "given" if args.epoch_seconds else how)

    def describe(self, trials: int) -> str:
        if not (self.epoch_seconds and self.epochs):
            return ("expected compute: unknown (pass --epoch-seconds and --epochs; a pilot sweep's trials report "
                    f"{EPOCH_SECONDS})")
        hours = trials * self.epochs * self.epoch_seconds * self.per_trial / 3600
        return (f"expected compute: {trials} trials × {self.epochs} epochs × {self.epoch_seconds:.1f} s/epoch "
                f"({self.how}) × {self.per_trial:g} {self.unit}/trial = {hours:.2f} {self.unit}-hours")


if __name__ == "__main__":
    sys.exit(main())
