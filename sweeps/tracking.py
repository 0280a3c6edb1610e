"""The writing side of our MLflow runs: experiments and parent runs, a sweep's (`SweepRun`) and the helpers final
training's run (sweeps/final/track.py: `FinalRun`) shares with it. Which store, and whether it answers, is
dashboards.mlflow_store, shared with the reports; so are the tag names, `run_type` among them.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Mapping

from mlflow import MlflowClient
from mlflow.entities import Param, Run, RunTag, ViewType

from dashboards.commands import mlflow_ui_words, shell_join
from dashboards.mlflow_store import RUN_TYPE_TAG, RUNNING, SWEEP_RUN, is_embedded, mask_secrets
from trainable.errors import ConfigError

# MLflow caps a param value at 6000 characters; longer ones (e.g. a long --arms list) are cut with a marker.
MAX_PARAM_CHARS = 6000


def ui_command(uri: str) -> str:
    """How to browse the store, as a command that runs as pasted (this environment's mlflow)."""
    if is_embedded(uri):
        return shell_join(mlflow_ui_words(uri))
    return f"open {mask_secrets(uri)} in a browser (the tracking server serves the UI)"


def git_commit(repo: Path) -> str:
    """HEAD's commit, with '-dirty' when the working tree has changes; 'unknown' outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _param(key: str, value: Any) -> Param:
    text = mask_secrets(str(value))
    return Param(key, text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - 12] + "…[truncated]")


def experiment_id_for(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    """The experiment named `name`: created (artifacts under `artifact_root`), restored from the trash, or as is."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_root)
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def create_parent_run(client: MlflowClient, experiment_id: str, run_name: str, run_type: str, *,
                      params: Mapping[str, Any], tags: Mapping[str, Any]) -> str:
    """A new parent run tagged `run_type` (its params cut to MLflow's limits, secrets masked); returns its id."""
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={**{k: str(v) for k, v in tags.items()}, RUN_TYPE_TAG: run_type})
    client.log_batch(run.info.run_id, params=[_param(k, v) for k, v in params.items()])
    return run.info.run_id


def reopen_parent_run(client: MlflowClient, name: str, experiment_id: str, parent_run_id: str, uri: str,
                      experiment: str | None = None) -> None:
    """The parent run of a run being resumed (checked as recorded_parent_run does), RUNNING again; its `resumes`
    tag counts the resumptions."""
    run = recorded_parent_run(client, name, experiment_id, parent_run_id, uri, experiment)
    resumes = int(run.data.tags.get("resumes", "0")) + 1
    client.update_run(parent_run_id, status=RUNNING)
    client.set_tag(parent_run_id, "resumes", str(resumes))


class SweepRun:
    """The sweep's MLflow experiment (named after the sweep) and its parent run (run_type=sweep)."""

    def __init__(self, client: MlflowClient, experiment_id: str, parent_run_id: str):
        self.client = client
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id

    @classmethod
    def start(cls, client: MlflowClient, name: str, *, artifact_root: str | None, params: Mapping[str, Any],
              tags: Mapping[str, Any], replace: bool = False) -> "SweepRun":
        experiment_id = experiment_id_for(client, name, artifact_root)
        if replace:  # --overwrite: the earlier sweep's runs go to MLflow's trash, not into this sweep's view
            for run in client.search_runs([experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=50000):
                client.delete_run(run.info.run_id)
        return cls(client, experiment_id, create_parent_run(client, experiment_id, name, SWEEP_RUN, params=params,
                                                            tags=tags))

    @classmethod
    def reopen(cls, client: MlflowClient, name: str, experiment_id: str, parent_run_id: str, uri: str
               ) -> "SweepRun":
        """The parent run of a sweep being resumed, RUNNING again."""
        reopen_parent_run(client, name, experiment_id, parent_run_id, uri)
        return cls(client, experiment_id, parent_run_id)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.parent_run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_text(self, text: str, file_name: str) -> None:
        self.client.log_text(self.parent_run_id, text, file_name)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.parent_run_id, status=status)


def recorded_parent_run(client: MlflowClient, name: str, experiment_id: str, parent_run_id: str, uri: str,
                        experiment: str | None = None) -> Run:
    """The parent run sweep.json names, checked to be a run of the sweep's own experiment (named `name`, unless
    `experiment` names it: final training's runs share one)."""
    try:
        run = client.get_run(parent_run_id)
        found = client.get_experiment(run.info.experiment_id)
    except Exception:  # noqa: BLE001 - MLflow raises its own exception types per store
        run = found = None
    if run is None or run.info.experiment_id != experiment_id or found.name != (experiment or name):
        raise ConfigError(f"--resume {name}: its parent run {parent_run_id} is not in the MLflow store "
                          f"{mask_secrets(uri)}; resume with the --mlflow-uri the sweep started with")
    return run
