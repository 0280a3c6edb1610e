"""MLflow for final training: one parent run (the final model, tag run_type=final) with a child run per member.

Its own run type, not a sweep's: many final runs share one experiment (--experiment), each named after its --out
folder, and the readers that list sweeps (dashboards/sweep_reader.py) skip them by their run_type tag. The parent
run holds the data and source of the configs, the test metrics, every report file as an artifact, and the model
(mlflow.pytorch, registered under a model name) with its config and thresholds. Child runs are the
members' Tune trials, written by the sweeps' driver-side logger (sweeps/mlflow_logger.py): per-epoch validation
metrics under the sweeps' names, so the UI charts them like sweep trials, plus the selected epoch.
"""
from __future__ import annotations

import contextlib
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, Metric, RunTag

import trainable
from dashboards.external_report import ExternalResult
from dashboards.final_report import METRIC_COLUMNS
from dashboards.mlflow_store import FINAL_RUN, PARENT_RUN_TAG, RUNNING
from trainable.config import TrialConfig
from trainable.deployed import DeployedClassifier
from trainable.findings import FINDINGS
from trainable.metric_names import external_metric

from ..tracking import create_parent_run, experiment_id_for, reopen_parent_run

MODEL_NAME = "model"
MODEL_INPUT = ("uint8 grayscale images (B, 1, S, S) decoded as trainable.data.cache.decode_image(path, S) does, "
               "S = the members' image_size; demographics (B, 4) encoded as trainable.data.demographics.FEATURES: "
               "(age - 46.6) / 16.6 (an unknown age replaced by the training split's mean), age_missing 1/0, "
               "sex M=+1 F=-1, view PA=+1 AP=-1 (needed only by members trained with demographic inputs)")
MODEL_OUTPUT = "(B, 14) probabilities, columns in `findings` order"
# What the logged model needs to be loaded (its code travels with it through code_paths).
MODEL_REQUIREMENTS = ("torch", "timm", "numpy", "pandas")
MAX_METRICS_PER_BATCH = 1000       # MLflow's limit on metrics per log_batch request


def _requirements() -> list[str]:
    pinned = []
    for package in MODEL_REQUIREMENTS:
        try:
            pinned.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pinned.append(package)
    return pinned


@contextlib.contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """mlflow.pytorch.log_model logs through the global tracking URI (and the env var it sets): set it only
    meanwhile, so the caller's process is left as it was."""
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


class FinalRun:
    """A final training's parent run (run_type=final) in the final-training experiment, and its member runs."""

    def __init__(self, client: MlflowClient, tracking_uri: str, experiment_id: str, parent_run_id: str):
        self.client = client
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.children: dict[str, str] = {}      # member name -> run id
        self.model_metrics: list[Metric] = []   # the parent's test and external metrics, linked to the logged model

    @classmethod
    def start(cls, client: MlflowClient, tracking_uri: str, *, experiment: str, run_name: str,
              artifact_root: str | None, params: Mapping[str, Any], tags: Mapping[str, Any]) -> "FinalRun":
        experiment_id = experiment_id_for(client, experiment, artifact_root)
        return cls(client, tracking_uri, experiment_id,
                   create_parent_run(client, experiment_id, run_name, FINAL_RUN, params=params, tags=tags))

    @classmethod
    def reopen(cls, client: MlflowClient, tracking_uri: str, *, name: str, experiment: str, experiment_id: str,
               parent_run_id: str) -> "FinalRun":
        """The final run of a final training being resumed, RUNNING again (its member runs: find_members)."""
        reopen_parent_run(client, name, experiment_id, parent_run_id, tracking_uri, experiment)
        return cls(client, tracking_uri, experiment_id, parent_run_id)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.parent_run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    # --- members ------------------------------------------------------------------------------------------------
    def find_members(self) -> dict[str, str]:
        """The member runs (child runs the driver's MLflowTrialLogger created, one per Tune trial), by name."""
        runs = self.client.search_runs([self.experiment_id], max_results=50000,
                                       filter_string=f"tags.`{PARENT_RUN_TAG}` = '{self.parent_run_id}'")
        self.children = {run.info.run_name: run.info.run_id for run in runs}
        return self.children

    def finish_member(self, name: str, *, selected_epoch: int, selected_value: float) -> None:
        run_id = self.children[name]
        self.client.set_tag(run_id, "selected_epoch", str(selected_epoch))
        self.client.log_metric(run_id, "selected_val_auc_mean", selected_value)

    # --- results ------------------------------------------------------------------------------------------------
    def log_test_metrics(self, test_metrics: pd.DataFrame, members: pd.DataFrame) -> None:
        """test_<metric>_<Finding> and test_{auc,f1,ece}_mean on the parent; each member's test AUCs on its run."""
        now = int(time.time() * 1000)
        metrics = [Metric(f"test_{column}_{finding}", float(value), now, 0)
                   for column in METRIC_COLUMNS for finding, value in test_metrics[column].items()
                   if np.isfinite(value)]
        for column in ("auc", "f1", "ece"):
            metrics.append(Metric(f"test_{column}_mean", float(np.nanmean(test_metrics[column])), now, 0))
        self.client.log_batch(self.parent_run_id, metrics=metrics)
        self.model_metrics = metrics
        for row in members.itertuples():
            if row.member in self.children:
                self.client.log_batch(self.children[row.member], metrics=[
                    Metric("test_auc_mean", float(row.test_auc_mean), now, 0),
                    *(Metric(f"test_auc_{f}", float(getattr(row, f"test_auc_{f}")), now, 0) for f in FINDINGS
                      if np.isfinite(getattr(row, f"test_auc_{f}")))])

    def log_external_metrics(self, results: Sequence[ExternalResult]) -> None:
        """Per external set, named as the internal test's (trainable.metric_names.external_metric):
        ext_<set>_<metric>_<Finding> for its shared findings, ext_<set>_{auc,f1}_mean over them, and the images
        used: ext_<set>_images_<Finding> (those that label the finding), ext_<set>_positives_<Finding>,
        ext_<set>_images and ext_<set>_patients (all its frontal ones); linked to the logged model as the test's
        are. Thresholds are NIH validation's, logged once as test_threshold_<Finding>."""
        now = int(time.time() * 1000)
        for result in results:
            name, table = result.data.layout, result.metrics
            columns = [c for c in (*METRIC_COLUMNS, "images", "positives") if c in table.columns and c != "threshold"]
            metrics = [Metric(external_metric(name, column, finding), float(value), now, 0)
                       for column in columns for finding, value in table[column].items() if np.isfinite(value)]
            metrics += [Metric(external_metric(name, column, "mean"), float(np.nanmean(table[column])), now, 0)
                        for column in ("auc", "f1") if np.isfinite(table[column]).any()]
            metrics += [Metric(external_metric(name, "images"), float(len(result.data.frame)), now, 0),
                        Metric(external_metric(name, "patients"), float(result.data.frame["patient_id"].nunique()),
                               now, 0)]
            self.client.log_batch(self.parent_run_id, metrics=metrics)     # at most 14 x 10 + 4: one batch
            self.model_metrics += metrics

    def log_files(self, out: Path) -> None:
        self.client.log_artifacts(self.parent_run_id, str(out))

    def log_model(self, model: DeployedClassifier, registered_model_name: str, *, config: TrialConfig,
                  config_file: Path, thresholds_file: Path, thresholds: Mapping[str, float], description: str) -> str:
        """Log the model on the parent run with its config and thresholds, register it; returns the version."""
        # Created here so it belongs to the run's experiment (log_model alone would file it under the active
        # experiment, MLflow's Default, whose artifacts may live anywhere).
        logged = self.client.create_logged_model(self.experiment_id, name=MODEL_NAME,
                                                 source_run_id=self.parent_run_id, model_type="classifier",
                                                 params={k: str(v) for k, v in config.to_dict().items()})
        with global_tracking_uri(self.tracking_uri):
            # No run_id: given one, MLflow links the run's metrics to the model with one request per metric
            # (get_metric_history), minutes against an authenticating server; the two requests below do the same.
            info = mlflow.pytorch.log_model(
                model, name=MODEL_NAME, model_id=logged.model_id,
                registered_model_name=registered_model_name,
                # pickle, not MLflow 3's default torch.export ("pt2"): the input preparation branches on tensor
                # shapes and dtypes, which export cannot trace; the pickled classes travel along in code_paths.
                serialization_format="pickle", code_paths=[str(Path(trainable.__file__).parent)],
                pip_requirements=_requirements(), extra_files=[str(config_file), str(thresholds_file)],
                metadata={"findings": list(FINDINGS), "thresholds": dict(thresholds), "input": MODEL_INPUT,
                          "output": MODEL_OUTPUT})
        self.client.log_outputs(self.parent_run_id, [LoggedModelOutput(logged.model_id, step=0)])
        linked = [Metric(m.key, m.value, m.timestamp, m.step, model_id=logged.model_id) for m in self.model_metrics]
        for start in range(0, len(linked), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.parent_run_id, metrics=linked[start:start + MAX_METRICS_PER_BATCH])
        model_version = str(info.registered_model_version)
        self.client.update_model_version(registered_model_name, model_version, description=description)
        return model_version

    def end(self, status: str) -> None:
        for run_id in self.children.values():
            if self.client.get_run(run_id).info.status == RUNNING:
                self.client.set_terminated(run_id, status=status)
        self.client.set_terminated(self.parent_run_id, status=status)
