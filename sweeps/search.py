"""The search: Optuna's TPE (seeded) proposes configs from search_spaces/optuna_space.yaml, ASHA stops poor trials
early, and trials that ASHA stopped reach Optuna as PRUNED instead of COMPLETE."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Any, Callable

import optuna
from ray import tune
from ray.air.constants import TRAINING_ITERATION
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from search_spaces import OPTUNA_SPACE_FILE, SearchParam, SearchSpace, build_config, load_optuna_space
from trainable.config import FIELD_TYPES
from trainable.data.nih import PreparedData
from trainable.errors import ConfigError
from trainable.tune import TrialContext

from .cluster import check_weight_files
from .demo import SEARCH_DEMO
from .record import SweepLocation
from .report import METRIC, MODE, SweepReport, TrialOutcome, fmt, format_table, outcomes
from .trial_description import TrialDescriber, trial_run_name

DESCRIPTION = """Search: Optuna TPE over search_spaces/optuna_space.yaml with an ASHA scheduler, --num-samples trials,
maximising val_auc_mean; the best full-budget config is written to best_config.json and tagged on the parent run.

    python sweeps/run_search.py                            # the demo: generated data, tiny model
    python sweeps/run_search.py --data /data/nih --num-samples 64 --epochs 12 --address auto --storage s3://b/sw
"""
BEST_CONFIG_FILE = "best_config.json"
TOP_TRIALS = 10
PROGRESS_PARAMS = 5       # searched params shown in the live progress table
EPOCH_KEY = "epoch"

# How each kind of param is asked of Optuna.
SUGGEST: dict[str, Callable[[Any, SearchParam], Any]] = {
    "categorical": lambda trial, p: trial.suggest_categorical(p.name, list(p.choices)),
    "float": lambda trial, p: trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step),
    "int": lambda trial, p: trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1)),
}


class DefineByRun:
    """Optuna define-by-run space: conditional params are only suggested when their condition holds."""

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial: optuna.Trial) -> None:
        chosen: dict[str, Any] = {}
        for param in self.space.params:
            if param.applies(chosen):
                chosen[param.name] = SUGGEST[param.kind](trial, param)


class PruningAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna a trial ASHA stopped before `budget` epochs was PRUNED.

    Stock OptunaSearch.on_trial_complete tells COMPLETE with the partial-epoch value, which biases TPE toward
    configs that start fast. Tune passes the result it stopped a trial on to on_trial_complete without
    passing it to on_trial_result first; a trial that ended by itself (early_stop_patience) was seen there,
    so only scheduler stops count as pruned.
    """

    def __init__(self, *args: Any, budget: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._budget = budget
        self._last_seen_epoch: dict[str, int] = {}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        super().on_trial_result(trial_id, result)
        self._last_seen_epoch[trial_id] = int(result.get(EPOCH_KEY, 0))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error or not result or not self._pruned(trial_id, result):
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        # Optuna records a pruned trial's last intermediate value; this one never reached on_trial_result.
        ot_trial = self._ot_trials[trial_id]
        ot_trial.report(result[self.metric], result.get(TRAINING_ITERATION, result[EPOCH_KEY]))
        self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
        self._completed_trials.add(trial_id)

    def _pruned(self, trial_id: str, result: dict) -> bool:
        epoch = result.get(EPOCH_KEY, self._budget)
        return (epoch < self._budget and epoch != self._last_seen_epoch.get(trial_id)
                and trial_id not in self._completed_trials and self.metric in result)


class Search:
    kind = "search"
    description = DESCRIPTION
    demo_defaults = SEARCH_DEMO

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("search")
        group.add_argument("--num-samples", type=int, default=20, help="trials to run (default: %(default)s)")
        group.add_argument("--search-seed", type=int, default=0, help="seed of the TPE sampler (default: 0)")
        group.add_argument("--grace-period", type=int, default=1,
                           help="ASHA: epochs every trial runs before it may be stopped (default: %(default)s)")
        group.add_argument("--reduction-factor", type=float, default=2.0,
                           help="ASHA: keep the top 1/N at each rung (default: %(default)s)")
        group.add_argument("--space-file", default=None, metavar="YAML",
                           help="the Optuna space (default: search_spaces/optuna_space.yaml)")

    def __init__(self, args: argparse.Namespace, sweep_overrides: dict[str, Any]):
        if args.num_samples < 1:
            raise ConfigError(f"--num-samples {args.num_samples}: expected at least 1")
        if not 1 <= args.grace_period <= args.epochs:
            raise ConfigError(f"--grace-period {args.grace_period}: expected 1..--epochs ({args.epochs})")
        if not 1 < args.reduction_factor < math.inf:
            raise ConfigError(f"--reduction-factor {args.reduction_factor:g}: expected a finite number above 1")
        space_file = args.space_file or OPTUNA_SPACE_FILE
        space = load_optuna_space(space_file)
        self.space = space.without(sweep_overrides)
        if not self.space.params:
            raise ConfigError(f"{space_file}: every param is fixed by --set; nothing left to search")
        left_out = [p.name for p in space.params if p not in self.space.params]
        self.notes = [f"note: --set fixes {', '.join(left_out)}: left out of the search"] if left_out else []
        self.progress_parameters = [p.name for p in self.space.params if not p.when][:PROGRESS_PARAMS]
        self.base = {**space.base_config().to_dict(), **sweep_overrides}
        base = build_config(self.base, source=f"{space_file}: base_preset {space.base_preset!r} with --set")
        backbones = next((p.choices for p in self.space.params if p.name == "backbone" and p.choices), ())
        check_weight_files([base, *(base.replace(backbone=name) for name in backbones)])
        self.args = args

    @property
    def plan_record(self) -> dict[str, Any]:
        plan = {"base": self.base, "space": [dataclasses.asdict(p) for p in self.space.params],
                **{key: getattr(self.args, key) for key in ("num_samples", "search_seed", "grace_period",
                                                            "reduction_factor")}}
        return json.loads(json.dumps(plan))

    def param_space(self) -> dict[str, Any]:
        return {}   # the searcher proposes every config

    def tune_options(self, location: SweepLocation | None = None) -> dict[str, Any]:   # location: unused here
        # With a define-by-run space OptunaSearch needs metric and mode itself; TuneConfig gets them too.
        searcher = PruningAwareOptunaSearch(DefineByRun(self.space), metric=METRIC, mode=MODE,
                                            sampler=optuna.samplers.TPESampler(seed=self.args.search_seed),
                                            budget=self.args.epochs)
        scheduler = ASHAScheduler(time_attr=EPOCH_KEY, max_t=self.args.epochs, grace_period=self.args.grace_period,
                                  reduction_factor=self.args.reduction_factor)
        return {"search_alg": searcher, "scheduler": scheduler, "num_samples": self.args.num_samples,
                "metric": METRIC, "mode": MODE}

    def context(self, data: PreparedData, cache_dir: str | None) -> TrialContext:
        return TrialContext(data=data, base_config=self.base, cache_dir=cache_dir)

    def describer(self, context: TrialContext) -> TrialDescriber:
        return TrialDescriber.for_sweep(self.kind, context)

    def report(self, results: tune.ResultGrid, *, title: str, epochs: int, describer: TrialDescriber,
               report_command: str) -> SweepReport:
        """Trials ranked by final val_auc_mean, full-budget trials first; the best full-budget one is the answer
        (a pruned trial's early value is not comparable with a trial trained to the end)."""
        trials = sorted((t for t in outcomes(results) if not t.failed),
                        key=lambda t: (t.ran_full_budget(epochs), t.value(METRIC)), reverse=True)
        failed = sum(t.failed for t in outcomes(results))
        searched = [p.name for p in self.space.params]
        rows = [[_name(t), str(t.epoch), "" if t.ran_full_budget(epochs) else "pruned", fmt(t.value(METRIC)),
                 fmt(t.value("val_f1_mean")), _params(t, searched)] for t in trials[:TOP_TRIALS]]
        lines = [title, f"{len(trials)} trial(s) ran, {sum(not t.ran_full_budget(epochs) for t in trials)} stopped early by "
                        f"ASHA, {failed} failed; top {min(TOP_TRIALS, len(trials))} by final val_auc_mean:", "",
                 format_table(["trial", "epochs", "", "AUC", "F1", "searched params"], rows, "lrlrrl"), ""]
        full = [t for t in trials if t.ran_full_budget(epochs)]
        if not full:
            lines.append("no trial ran its full budget: no best config")
            return SweepReport(text="\n".join(lines), tags={"failed_trials": str(failed)}, files={})
        best = full[0]
        config = describer.config(best.config)
        lines += [f"best: {_name(best)} with val_auc_mean {fmt(best.value(METRIC))} (single-split validation); "
                  f"its full config is {BEST_CONFIG_FILE}", "",
                  "Factor importance, and the ablation that re-runs the top configs with several seeds, are in the "
                  "search report:", f"  {report_command}"]
        tags = {"failed_trials": str(failed), "best_trial": _name(best), "best_val_auc_mean": fmt(best.value(METRIC), 4),
                "best_config": json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))}
        return SweepReport(text="\n".join(lines), tags=tags, files={BEST_CONFIG_FILE: config.to_json() + "\n"})


def _name(trial: TrialOutcome) -> str:
    return trial_run_name(trial.config, str(trial.metrics.get("trial_id", "?")))


def _params(trial: TrialOutcome, searched: list[str]) -> str:
    def show(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)
    return " ".join(f"{key}={show(trial.config[key])}" for key in searched
                    if key in trial.config and key in FIELD_TYPES)
