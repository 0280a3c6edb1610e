"""The Tune callback that is a sweep's only MLflow writer: one child run per trial under the sweep's parent run.

Trials never talk to MLflow; the driver logs what they report. So the embedded SQLite store has one writer no
matter how many trials run, trials on other nodes need no route to the store, and a tracking server works
unchanged. Ray's own MLflowLoggerCallback is not used: it has no parent run, keys runs by in-memory Trial
objects (so a resumed sweep would duplicate them) and logs no predictions.

Child runs are found by their `trial_id` tag before one is created, so a trial retried after a worker died, or
continued by `--resume`, keeps its run; epochs already logged for a run are skipped. Outcomes:
  FINISHED  the trial ran its full budget (or stopped itself: early_stop_patience)
  KILLED    with tag pruned=true: the scheduler (ASHA) stopped it early; its metrics are partial-budget
  KILLED    with tag interrupted=true: the sweep was interrupted; `--resume` sets it RUNNING again
  FAILED    with tag error=<last line of the error>, and error.txt as an artifact
A trial begun after Tune last saved the experiment is unknown to the state `--resume` restores: Tune (or the
searcher) proposes it again under a new trial id. Its earlier child run is deleted (MLflow's soft delete, tag
superseded=true) at the resumed sweep's first step, so each trial has one run.
Every child run is also tagged with where its trial ran: device (`cpu` or the CUDA device name), node,
torch_version, timm_version, cuda_version, python_version.

It also keeps the digests of Tune's saved state on the parent run (see tune_state): Tune asks callbacks for
their state while it saves the experiment, after writing the other state files to its local staging folder and
before uploading them to the storage, which is where this logger records them.
"""
from __future__ import annotations

import glob
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from ray.train.constants import _get_ray_train_session_dir
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.result import AUTO_RESULT_KEYS, DONE, TRAINING_ITERATION

from dashboards.mlflow_store import FAILED, FINISHED, KILLED, PARENT_RUN_TAG, RUNNING
from trainable.checkpoint_files import PREDICTIONS_FILE, THRESHOLDS_FILE
from trainable.metric_names import VAL_AUC_MEAN
from trainable.tune import WHERE_KEY

from .trial_description import TrialDescriber, trial_run_name
from .tune_state import StateDigests

STEP_KEY = "epoch"
PROBE_METRIC = VAL_AUC_MEAN           # its history tells which epochs a run already has
NOT_METRICS = {*AUTO_RESULT_KEYS, DONE, STEP_KEY, "trial_id", "experiment_tag", "should_checkpoint"}
MAX_ERROR_TAG_CHARS = 500


def trial_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The trainable's own numeric metrics in a Tune result (Tune's bookkeeping keys left out)."""
    return {key: float(value) for key, value in result.items()
            if key not in NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)}


@dataclass
class _ChildRun:
    run_id: str
    budget: int                                   # epochs the trial was configured for
    logged_steps: set[int] = field(default_factory=set)
    pruned_at: int | None = None                  # epoch at which the scheduler stopped it, if early
    where: dict | None = None                     # device, node and versions last tagged


class MLflowTrialLogger(Callback):
    """Logs each trial to a child run of `parent_run_id`; the tracking URI is the driver's (mlflow.set_tracking_uri),
    so no credentials end up in Tune's pickled experiment state."""

    def __init__(self, *, experiment_id: str, parent_run_id: str, describer: TrialDescriber,
                 tune_name: str | None = None):
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.tune_name = tune_name                  # Tune's experiment name, when not the MLflow experiment's
        self.describer = describer
        self._client: MlflowClient | None = None
        self._runs: dict[str, _ChildRun] = {}      # open child runs of trials started in this session
        self._started: set[str] = set()             # every trial started in this session
        self._digests: StateDigests | None = None
        self._superseded_checked = False            # this session's first step has looked for superseded runs

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_runs": {}, "_started": set(), "_digests": None,
                "_superseded_checked": False}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient()
        return self._client

    # --- Tune hooks -----------------------------------------------------------------------------------------
    def get_state(self) -> None:
        """Called while Tune saves the experiment: record the state files it has just staged (returns no state
        of its own, so Tune writes no callback-state file)."""
        if self._digests is None:
            self._digests = StateDigests.load(self.client, self.parent_run_id) or \
                StateDigests(self.client, self.parent_run_id, {})
        self._digests.add_folder(self._staging_folder())
        return None

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        """At the first step, `trials` are those Tune restored (none in a new sweep): a child run of this sweep
        whose trial is not among them began after Tune's last save and is superseded."""
        if self._superseded_checked:
            return
        self._superseded_checked = True
        known = {trial.trial_id for trial in trials}
        superseded = [run for run in self.client.search_runs([self.experiment_id], max_results=50000)
                      if run.data.tags.get(PARENT_RUN_TAG) == self.parent_run_id
                      and run.data.tags.get("trial_id") not in known]
        for run in superseded:
            self.client.set_tag(run.info.run_id, "superseded", "true")
            if run.info.status == RUNNING:
                self.client.set_terminated(run.info.run_id, status=KILLED)
            self.client.delete_run(run.info.run_id)
        if superseded:
            print(f"resume: {', '.join(sorted(run.info.run_name for run in superseded))} began after Tune last "
                  f"saved the sweep: run again as new trials (their earlier MLflow runs deleted)", flush=True)

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._started.add(trial.trial_id)
        self._child(trial)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        child = self._child(trial)
        step = int(result.get(STEP_KEY, result.get(TRAINING_ITERATION, 0)))
        if result.get(DONE) and step < child.budget:
            # Tune marks the result it decided to stop on as done; a trial ending by itself never is.
            child.pruned_at = step
        where = result.get(WHERE_KEY)
        if isinstance(where, dict) and where != child.where:      # first result, or a retry ran elsewhere
            self.client.log_batch(child.run_id, tags=[RunTag(key, str(value)) for key, value in where.items()])
            child.where = where
        if step in child.logged_steps:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in trial_metrics(result).items()]
        self.client.log_batch(child.run_id, metrics=metrics)
        child.logged_steps.add(step)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        # Tune also "completes" pending trials it drops; those never ran and get no run.
        child = self._runs.pop(trial.trial_id, None) or self._child(trial, keep=False, create=False)
        if child is None:
            return
        self._log_checkpoint_files(child.run_id, trial)
        if child.pruned_at is not None:
            self.client.set_tag(child.run_id, "pruned", "true")
            self.client.set_tag(child.run_id, "pruned_at_epoch", str(child.pruned_at))
            self.client.set_terminated(child.run_id, status=KILLED)
        else:
            self.client.set_terminated(child.run_id, status=FINISHED)

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        child = self._child(trial)
        self.client.set_tag(child.run_id, "retries", str(trial.num_failures))

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        # Tune would unpickle the error.pkl it wrote, from the storage, for the result grid: the text error.txt
        # (what error= and error.txt report anyway) is read instead
        trial.run_metadata.pickled_error_filename = None
        trial.run_metadata.invalidate_cache()
        child = self._runs.pop(trial.trial_id, None) or self._child(trial, keep=False)
        self._fail(child.run_id, trial)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        """Leave no child run RUNNING.

        A run still open here belongs to a trial the sweep was interrupted in (Tune's clean-up stops such
        trials without on_trial_complete, and reports them TERMINATED). A RUNNING run of a trial not started in
        this session was left by a driver that died; it gets the final status Tune recorded for its trial.
        """
        for child in self._runs.values():
            self._interrupted(child.run_id)
        self._runs.clear()
        by_id = {trial.trial_id: trial for trial in trials}
        still_running = self.client.search_runs(
            [self.experiment_id], filter_string=f"attributes.status = '{RUNNING}'", max_results=50000)
        for run in still_running:
            trial_id = run.data.tags.get("trial_id", "")
            if run.data.tags.get(PARENT_RUN_TAG) != self.parent_run_id or trial_id in self._started:
                continue
            trial = by_id.get(trial_id)
            status = trial.status if trial is not None else None
            if status == Trial.TERMINATED:
                self._log_checkpoint_files(run.info.run_id, trial)
                self.client.set_terminated(run.info.run_id, status=FINISHED)
            elif status == Trial.ERROR:
                self._fail(run.info.run_id, trial)
            else:
                self._interrupted(run.info.run_id)

    # --- helpers ----------------------------------------------------------------------------------------------
    def _staging_folder(self) -> Path:
        """Tune's local staging folder of this experiment (`<Ray session>/artifacts/<time>/<name>/driver_artifacts`,
        on the driver's own disk), where it writes its state before uploading it to the storage."""
        name = self.tune_name or self.client.get_experiment(self.experiment_id).name
        session = Path(_get_ray_train_session_dir())
        found = max(session.glob(f"*/{glob.escape(name)}/driver_artifacts"), key=lambda f: f.stat().st_mtime,
                    default=None)
        if found is None:    # Ray laid out its staging differently: better no save than an unrecorded one
            raise RuntimeError(f"no staging folder of experiment {name!r} under {session}: cannot record the "
                               f"digests of Tune's state")
        return found

    def _child(self, trial: Trial, *, keep: bool = True, create: bool = True) -> _ChildRun | None:
        """The trial's open child run: found by its trial_id tag (retry, resume) or created."""
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        config = self.describer.config(trial.config)
        found = [run for run in self.client.search_runs([self.experiment_id],
                                                        filter_string=f"tags.trial_id = '{trial.trial_id}'")
                 if run.data.tags.get(PARENT_RUN_TAG) == self.parent_run_id]
        if found:
            run_id = found[0].info.run_id
            if found[0].info.status != RUNNING:
                self.client.update_run(run_id, status=RUNNING)
            if "interrupted" in found[0].data.tags:
                self.client.delete_tag(run_id, "interrupted")
            steps = {metric.step for metric in self.client.get_metric_history(run_id, PROBE_METRIC)}
        elif not create:
            return None
        else:
            tags = {**self.describer.tags(trial.config, trial.trial_id), PARENT_RUN_TAG: self.parent_run_id}
            run_id = self.client.create_run(self.experiment_id, run_name=trial_run_name(trial.config, trial.trial_id),
                                            tags=tags).info.run_id
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in config.to_dict().items()])
            steps = set()
        child = _ChildRun(run_id=run_id, budget=config.epochs, logged_steps=steps)
        if keep:
            self._runs[trial.trial_id] = child
        return child

    def _log_checkpoint_files(self, run_id: str, trial: Trial) -> None:
        """The last checkpoint's validation probabilities and thresholds, read from the Tune storage (so this
        works whichever node ran the trial)."""
        checkpoint = trial.checkpoint
        if checkpoint is None:
            return
        self.client.set_tag(run_id, "checkpoint", checkpoint.path)
        with checkpoint.as_directory() as folder:
            for name in (PREDICTIONS_FILE, THRESHOLDS_FILE):
                if (Path(folder) / name).is_file():
                    self.client.log_artifact(run_id, str(Path(folder) / name))

    def _interrupted(self, run_id: str) -> None:
        self.client.set_tag(run_id, "interrupted", "true")
        self.client.set_terminated(run_id, status=KILLED)

    def _fail(self, run_id: str, trial: Trial) -> None:
        # On a first failure Tune has written error.txt only in the driver's staging folder, not yet to storage.
        local = Path(trial.error_file) if trial.error_file else None
        error = (trial.get_error() or (local.read_text() if local is not None and local.is_file() else None)
                 or "unknown error (no error file)")
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        self.client.set_tag(run_id, "error", (lines[-1] if lines else str(error))[:MAX_ERROR_TAG_CHARS])
        self.client.log_text(run_id, str(error), "error.txt")
        self.client.set_terminated(run_id, status=FAILED)
