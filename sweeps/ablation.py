"""The ablation: arms x seeds as a Tune grid, all with the same epoch budget, and the per-arm table at the end."""
from __future__ import annotations

import argparse
import json
from typing import Any

from ray import tune

from dashboards.effects import DEFAULT_ALPHA, DEFAULT_MARGIN, SeedRounds
from search_spaces import BASELINE_ARM, Arm, build_config, load_arms
from trainable.data.nih import PreparedData
from trainable.errors import ConfigError
from trainable.tune import ARM_KEY, TrialContext

from .adaptive import ROUNDS_FILE, AdaptiveSeeds, checkpoint_predictions, replay, rounds_record
from .cluster import check_weight_files
from .demo import ABLATION_DEMO
from .record import SweepLocation
from .report import SweepReport, fmt, fmt_mean_sd, format_table, mean_sd, outcomes
from .trial_description import TrialDescriber

DESCRIPTION = """Ablation: every arm of search_spaces/arms.yaml (or --arms) x --seeds seeds as Ray Tune trials, each
with the same --epochs budget, logged to MLflow (one parent run, one child run per trial).

    python sweeps/run_ablation.py                          # the demo: generated data, tiny model, minutes
    python sweeps/run_ablation.py --data /data/nih --address auto --storage /nfs/sweeps --gpus-per-trial 0.5
    python sweeps/run_ablation.py --data /data/nih --seeds 3 --max-seeds 12 --until-decided   # seeds as needed
"""


class Ablation:
    kind = "ablation"
    description = DESCRIPTION
    demo_defaults = ABLATION_DEMO
    progress_parameters = [ARM_KEY, "seed"]

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("ablation")
        group.add_argument("--arms", default=None, metavar="A,B,C",
                           help="arms to run (default: all); the baseline is always added, Δ needs it")
        group.add_argument("--arms-file", default=None, metavar="YAML",
                           help="more arms: a mapping of arm name -> config keys it changes (format of "
                                "search_spaces/arms.yaml)")
        group.add_argument("--seeds", type=int, default=3, help="seeds per arm, 0..N-1 (default: %(default)s)")
        group.add_argument("--until-decided", action="store_true",
                           help="after the first --seeds seeds, give the arms whose Δ mean AUC is still "
                                "inconclusive more seeds, round by round, until every arm is decided (helps, hurts, "
                                "equivalent) or --max-seeds is reached; O'Brien-Fleming alpha spending keeps the "
                                "error rate (see sweeps/adaptive.py)")
        group.add_argument("--max-seeds", type=int, default=None,
                           help="--until-decided: seed budget per arm (default: 4 x --seeds)")
        group.add_argument("--seeds-per-round", type=int, default=None,
                           help="--until-decided: seeds added per round (default: --seeds)")
        group.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                           help="equivalence margin on Δ mean AUC used to decide (default: %(default)s)")

    def __init__(self, args: argparse.Namespace, sweep_overrides: dict[str, Any]):
        if "seed" in sweep_overrides:
            raise ConfigError("--set seed: an ablation runs seeds 0..N-1 of --seeds for every arm")
        if args.seeds < 1:
            raise ConfigError(f"--seeds {args.seeds}: expected at least 1")
        self.rounds = _seed_rounds(args)
        if not args.margin > 0:
            raise ConfigError(f"--margin {args.margin}: expected a number > 0")
        self.margin = args.margin
        arms = load_arms(extra=args.arms_file)
        self.arms = [arms[name] for name in _selected(args.arms, arms)]
        self.seeds = list(range(args.seeds))
        self.baseline = arms[BASELINE_ARM].config({}).to_dict()
        # --set and --epochs go over every arm's own keys: they set the budget and the quick-run size.
        self.overrides = {arm.name: {**arm.overrides, **sweep_overrides} for arm in self.arms}
        configs = [build_config({**self.baseline, **self.overrides[arm.name]},
                                source=f"{arm.source}: arm {arm.name!r} with --set/--epochs") for arm in self.arms]
        check_weight_files(configs)
        self.notes = [f"note: arm {arm.name!r} only changes {', '.join(sorted(arm.overrides))}, which --set fixes "
                      f"for every arm; it repeats the baseline" for arm in self.arms
                      if arm.name != BASELINE_ARM and arm.overrides and set(arm.overrides) <= set(sweep_overrides)]

    @property
    def plan_record(self) -> dict[str, Any]:
        plan = {"arms": {arm.name: {"factor": arm.factor, "overrides": self.overrides[arm.name]} for arm in self.arms},
                "seeds": self.seeds, "baseline": self.baseline}
        if self.rounds is not None:
            plan["rounds"] = {"initial": self.rounds.initial, "max_seeds": self.rounds.max_seeds,
                              "step": self.rounds.step, "margin": self.margin}
        return json.loads(json.dumps(plan))

    def param_space(self) -> dict[str, Any]:
        if self.rounds is not None:
            return {}     # the searcher proposes every (arm, seed)
        return {ARM_KEY: tune.grid_search([arm.name for arm in self.arms]), "seed": tune.grid_search(self.seeds)}

    def tune_options(self, location: SweepLocation) -> dict[str, Any]:
        if self.rounds is None:
            return {}   # a grid with no scheduler: no metric to rank by while it runs
        searcher = AdaptiveSeeds([arm.name for arm in self.arms], BASELINE_ARM, self.rounds, location=location,
                                 margin=self.margin, alpha=DEFAULT_ALPHA)
        return {"search_alg": searcher, "num_samples": -1}     # until the searcher says it is finished

    def context(self, data: PreparedData, cache_dir: str | None) -> TrialContext:
        return TrialContext(data=data, base_config=self.baseline, arms=self.overrides, cache_dir=cache_dir)

    def describer(self, context: TrialContext) -> TrialDescriber:
        return TrialDescriber.for_sweep(self.kind, context, {arm.name: arm.factor for arm in self.arms})

    def report(self, results: tune.ResultGrid, *, title: str, epochs: int, describer: TrialDescriber,
               report_command: str) -> SweepReport:
        """Per arm: mean ± sd over seeds of the final-epoch mean AUC and F1, and Δ vs the baseline's means.

        The final epoch (not each trial's best) is what the table reports: picking the best epoch on the same
        validation split it is scored on would flatter every arm, and the final epoch's predictions are the
        ones logged to MLflow for the effect analysis.
        """
        trials = [t for t in outcomes(results) if not t.failed]
        failed = sum(t.failed for t in outcomes(results))
        stats: dict[str, dict[str, Any]] = {}
        for arm in self.arms:
            mine = [t for t in trials if t.config.get(ARM_KEY) == arm.name]
            stats[arm.name] = {"factor": arm.factor, "n": len(mine),
                               "auc": mean_sd([t.value("val_auc_mean") for t in mine]),
                               "f1": mean_sd([t.value("val_f1_mean") for t in mine])}
        base = stats[BASELINE_ARM]
        rows = [[name, s["factor"], str(s["n"]), fmt_mean_sd(*s["auc"]),
                 "" if name == BASELINE_ARM else fmt(s["auc"][0] - base["auc"][0], signed=True),
                 fmt_mean_sd(*s["f1"]),
                 "" if name == BASELINE_ARM else fmt(s["f1"][0] - base["f1"][0], signed=True)]
                for name, s in stats.items()]
        header, align = ["arm", "factor", "seeds", "AUC mean ± sd", "ΔAUC", "F1 mean ± sd", "ΔF1"], "llrrrrr"
        stops, record = self._rounds(trials)
        if self.rounds is not None:
            header, align = [*header, "seeds stopped because"], align + "l"
            rows = [[*row, "control: seeded with the undecided arms" if row[0] == BASELINE_ARM
                     else stops.get(row[0], "?")] for row in rows]
        table = format_table(header, rows, align)
        lines = [title, f"validation metrics of the final epoch (budget {epochs}), mean ± sd over seeds; "
                        f"Δ = arm mean − baseline mean", "", table, "",
                 "Single-split validation numbers without confidence intervals. The effect analysis (paired "
                 "bootstrap over patients, combined over seeds, with verdicts per finding) is the ablation report:",
                 f"  {report_command}"]
        if self.rounds is not None:
            lines.insert(2, f"--until-decided: rounds of {self.rounds.step} seed(s) from {self.rounds.initial} up to "
                            f"{self.rounds.max_seeds} per arm, margin {self.margin:g}, O'Brien-Fleming alpha spending "
                            f"({ROUNDS_FILE})")
        if failed:
            lines.append(f"{failed} trial(s) failed and are left out; see their FAILED runs in MLflow.")
        csv = "\n".join(",".join(map(str, [name, s["factor"], s["n"], *s["auc"], *s["f1"]]))
                        for name, s in stats.items())
        files = {"ablation_table.csv": "arm,factor,seeds,auc_mean,auc_sd,f1_mean,f1_sd\n" + csv + "\n"}
        if record:
            files[ROUNDS_FILE] = record
        return SweepReport(text="\n".join(lines), tags={"failed_trials": str(failed)}, files=files)

    def _rounds(self, trials: list) -> tuple[dict[str, str], str]:
        """--until-decided: why each arm stopped, replayed from the trials' predictions as the searcher saw them,
        and seed_rounds.json."""
        if self.rounds is None:
            return {}, ""
        checkpoints = {f"{t.config[ARM_KEY]}/{t.config['seed']}": t.checkpoint for t in trials if t.checkpoint}
        analysis = replay(checkpoint_predictions(checkpoints, [arm.name for arm in self.arms]), BASELINE_ARM,
                          self.rounds, margin=self.margin, alpha=DEFAULT_ALPHA)
        return dict(analysis.stops), rounds_record(analysis, self.rounds, self.margin)


def _seed_rounds(args: argparse.Namespace) -> SeedRounds | None:
    """--until-decided's rounds; --max-seeds and --seeds-per-round mean nothing without it."""
    if not args.until_decided:
        given = [flag for flag, value in (("--max-seeds", args.max_seeds), ("--seeds-per-round", args.seeds_per_round))
                 if value is not None]
        if given:
            raise ConfigError(f"{given[0]} needs --until-decided (a fixed ablation runs --seeds seeds per arm)")
        return None
    max_seeds = args.max_seeds if args.max_seeds is not None else 4 * args.seeds
    step = args.seeds_per_round if args.seeds_per_round is not None else args.seeds
    if max_seeds < args.seeds or step < 1:
        raise ConfigError(f"--until-decided: --max-seeds {max_seeds} must be at least --seeds {args.seeds}, and "
                          f"--seeds-per-round {step} at least 1")
    return SeedRounds(initial=args.seeds, max_seeds=max_seeds, step=step)


def _selected(requested: str | None, arms: dict[str, Arm]) -> list[str]:
    if requested is None:
        return list(arms)
    names = [name.strip() for name in requested.split(",") if name.strip()]
    unknown = [name for name in names if name not in arms]
    if unknown or not names:
        raise ConfigError(f"--arms {requested!r}: unknown arm(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                          f"known arms: {', '.join(arms)}")
    if BASELINE_ARM not in names:
        names.insert(0, BASELINE_ARM)
    return list(dict.fromkeys(names))
