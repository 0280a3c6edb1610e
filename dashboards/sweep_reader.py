"""Read a sweep back from MLflow: its parent run, its trials (child runs) and their saved validation predictions.

The layout is the one sweeps/ writes (sweeps/tracking.py, sweeps/mlflow_logger.py): experiment = sweep name, one
parent run (tags `run_type` = sweep, `kind` = ablation | search; params = the sweep's CLI arguments; a final
training's parent run, run_type = final, is not a sweep and is skipped), one child run per trial (tag
`mlflow.parentRunId`; tags `arm`, `factor`, `seed`, `pruned`; params = the flat TrialConfig; the final epoch's
`val_predictions.npz` and `thresholds.json` as artifacts at the run's artifact root).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from trainable.checkpoint_files import PREDICTIONS_FILE, THRESHOLDS_FILE
from trainable.errors import DataError, UserError

from .effects import SeedRounds, TrialPredictions
from .mlflow_store import DB_FILE, FINAL_RUN, FINISHED, PARENT_RUN_TAG, RUN_TYPE_TAG, resolve_tracking_uri

DEFAULT_STORE = Path("runs") / DB_FILE     # where the sweeps put the embedded store with their default --out
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class TrialRun:
    """One trial's child run: its name, status, tags, params (the flat TrialConfig) and final metric values."""
    run_id: str
    name: str
    status: str
    tags: Mapping[str, str]
    params: Mapping[str, str]
    metrics: Mapping[str, float]
    start_time: int = 0
    end_time: int = 0

    @property
    def arm(self) -> str | None:
        return self.tags.get("arm")

    @property
    def seed(self) -> int:
        return int(self.tags.get("seed", self.params.get("seed", 0)))

    @property
    def pruned(self) -> bool:
        return self.tags.get("pruned", "").lower() == "true"

    @property
    def full_budget(self) -> bool:
        """Ran to its end: finished, and not stopped early by the scheduler."""
        return self.status == FINISHED and not self.pruned


@dataclass
class SweepResults:
    """A finished or running sweep as MLflow holds it: its parent run's tags and params, and its trials' runs."""
    tracking_uri: str
    experiment_name: str
    parent_run_id: str
    parent_tags: Mapping[str, str]
    parent_params: Mapping[str, str]
    trials: list[TrialRun]
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.parent_tags.get("kind", "ablation")

    @property
    def name(self) -> str:
        return self.parent_tags.get("mlflow.runName", self.experiment_name)


def default_tracking_uri(cli_uri: str | None) -> str:
    """--mlflow-uri, else MLFLOW_TRACKING_URI, else the SQLite store the sweeps write by default (which must
    exist: a report on an empty new store would say nothing useful)."""
    if not (cli_uri or os.environ.get("MLFLOW_TRACKING_URI")) and not DEFAULT_STORE.is_file():
        raise UserError(f"no MLflow store at {DEFAULT_STORE} (the sweeps' default); pass --mlflow-uri")
    return resolve_tracking_uri(cli_uri, DEFAULT_STORE.parent)


def open_sweep(client, sweep: str, tracking_uri: str = "") -> SweepResults:
    """The sweep named by a parent run id or an experiment name (its latest parent run)."""
    parent, notes = _parent_run(client, sweep)
    experiment = client.get_experiment(parent.info.experiment_id)
    children = client.search_runs([experiment.experiment_id], max_results=50000,
                                  filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent.info.run_id}'")
    trials = [TrialRun(run_id=run.info.run_id, name=run.data.tags.get("mlflow.runName", run.info.run_id),
                       status=run.info.status, tags=dict(run.data.tags), params=dict(run.data.params),
                       metrics=dict(run.data.metrics), start_time=run.info.start_time or 0,
                       end_time=run.info.end_time or 0)
              for run in children]
    return SweepResults(tracking_uri=tracking_uri,
                        experiment_name=experiment.name, parent_run_id=parent.info.run_id,
                        parent_tags=dict(parent.data.tags), parent_params=dict(parent.data.params),
                        trials=sorted(trials, key=lambda t: t.name), notes=notes)


def _parent_run(client, sweep: str) -> tuple[Any, list[str]]:
    if RUN_ID.match(sweep):
        try:
            run = client.get_run(sweep)
        except Exception:  # noqa: BLE001 - stores raise their own exception types for a missing run
            run = None
        if run is not None:
            if PARENT_RUN_TAG in run.data.tags:
                raise UserError(f"--sweep {sweep}: that is a trial's run; pass its sweep's parent run "
                                f"{run.data.tags[PARENT_RUN_TAG]} (or the experiment name)")
            if is_final_run(run):
                raise UserError(f"--sweep {sweep}: that is a final training's run ({RUN_TYPE_TAG}={FINAL_RUN}), "
                                f"not a sweep; pass a sweep's parent run id or experiment name")
            return run, []
    experiment = client.get_experiment_by_name(sweep)
    if experiment is None:
        known = [e.name for e in client.search_experiments(max_results=50)]
        raise UserError(f"--sweep {sweep!r}: no parent run id or experiment of that name in the MLflow store "
                        f"(experiments: {', '.join(known) or 'none'})")
    runs = client.search_runs([experiment.experiment_id], max_results=50000, order_by=["attributes.start_time DESC"])
    parents = [run for run in runs if PARENT_RUN_TAG not in run.data.tags and not is_final_run(run)]
    if not parents:
        finals = sum(PARENT_RUN_TAG not in run.data.tags and is_final_run(run) for run in runs)
        why = f"only final training runs ({finals}, {RUN_TYPE_TAG}={FINAL_RUN})" if finals else \
            "no parent run (not written by sweeps/?)"
        raise UserError(f"--sweep {sweep!r}: experiment has {why}; pass a sweep's parent run id or experiment name")
    notes = [f"experiment {sweep} holds {len(parents)} sweeps (parent runs); the latest, {parents[0].info.run_id}, "
             f"is reported; pass another parent run id to --sweep to choose"] if len(parents) > 1 else []
    return parents[0], notes


def is_final_run(run) -> bool:
    """A final training's parent run (run_type=final): in an experiment, beside sweeps, but not one of them."""
    return run.data.tags.get(RUN_TYPE_TAG) == FINAL_RUN


def load_trial_predictions(client, trial: TrialRun, folder: str | Path) -> TrialPredictions:
    """The trial's final validation predictions and thresholds, downloaded from its artifacts into `folder`."""
    target = Path(folder) / trial.run_id
    target.mkdir(parents=True, exist_ok=True)
    try:
        npz = client.download_artifacts(trial.run_id, PREDICTIONS_FILE, str(target))
        thresholds_path = client.download_artifacts(trial.run_id, THRESHOLDS_FILE, str(target))
    except Exception as err:  # noqa: BLE001 - missing artifacts surface as store-specific exceptions
        raise DataError(f"trial {trial.name} (run {trial.run_id}): no {PREDICTIONS_FILE} / {THRESHOLDS_FILE} "
                        f"artifacts ({str(err).splitlines()[0][:200] if str(err) else type(err).__name__})") from None
    try:
        return read_trial_predictions(npz, thresholds_path, trial.name)
    except DataError as err:
        raise DataError(f"trial {trial.name} (run {trial.run_id}): {err}") from None


def read_trial_predictions(npz: str | Path, thresholds_path: str | Path, name: str) -> TrialPredictions:
    """A trial's val_predictions.npz and thresholds.json, as trainable.train writes them into each checkpoint."""
    try:
        with np.load(npz, allow_pickle=False) as saved:
            findings = [str(f) for f in saved["findings"]]
            labels, probs, images = saved["labels"], saved["probs"], saved["images"].astype(str)
        by_finding = json.loads(Path(thresholds_path).read_text())
        thresholds = np.array([float(by_finding[f]) for f in findings])
    except (KeyError, ValueError, OSError) as err:
        raise DataError(f"unreadable {PREDICTIONS_FILE} or {THRESHOLDS_FILE} ({err})") from None
    return TrialPredictions(labels=labels, probs=probs, thresholds=thresholds, images=images, name=name)


def ablation_trials(sweep: SweepResults) -> dict[str, list[TrialRun]]:
    """{arm: its full-budget trials, one per seed}; what is left out (failed, interrupted, repeats) goes to notes."""
    arms: dict[str, dict[int, TrialRun]] = {}
    for trial in sorted(sweep.trials, key=lambda t: t.start_time):
        if trial.arm is None:
            sweep.notes.append(f"{trial.name}: no `arm` tag, left out")
        elif not trial.full_budget:
            reason = "pruned" if trial.pruned else trial.tags.get("error", trial.status.lower())
            sweep.notes.append(f"{trial.name}: did not finish ({reason}), left out")
        else:
            if trial.seed in arms.setdefault(trial.arm, {}):
                sweep.notes.append(f"{trial.name}: two finished runs for arm {trial.arm} seed {trial.seed}; "
                                   f"the later one ({trial.run_id}) is used")
            arms[trial.arm][trial.seed] = trial
    return {arm: [by_seed[s] for s in sorted(by_seed)] for arm, by_seed in arms.items()}


def load_arm_predictions(client, arms: Mapping[str, list[TrialRun]], folder: str | Path | None = None
                         ) -> dict[str, list[TrialPredictions]]:
    with tempfile.TemporaryDirectory(prefix="ablation-report-") as scratch:
        where = folder or scratch
        return {arm: [load_trial_predictions(client, trial, where) for trial in trials] for arm, trials in arms.items()}


def parent_param(sweep: SweepResults, key: str, default: Any = None) -> Any:
    value = sweep.parent_params.get(key)
    return default if value in (None, "None", "") else value


def sweep_rounds(sweep: SweepResults) -> tuple[SeedRounds | None, float | None]:
    """The seed rounds of a sweep run with --until-decided (None for a fixed one) and its --margin, from the
    parent run's params (the sweep's CLI arguments)."""
    margin = parent_param(sweep, "margin")
    margin = float(margin) if margin is not None else None
    if str(parent_param(sweep, "until_decided", "False")) != "True":
        return None, margin
    seeds = int(parent_param(sweep, "seeds"))
    return SeedRounds(initial=seeds, max_seeds=int(parent_param(sweep, "max_seeds", seeds)),
                      step=int(parent_param(sweep, "seeds_per_round", seeds))), margin
