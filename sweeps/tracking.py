"""MLflow for a sweep: which tracking store, whether it answers, and the sweep's experiment and parent run.

The embedded default is one SQLite file written only by the driver (see mlflow_logger), so it never has
concurrent writers; `--mlflow-uri` / MLFLOW_TRACKING_URI points at a tracking server for shared use.

Credentials never travel in the URI MLflow sees: a `user:password@` in an http(s) URI is moved into MLflow's own
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD before any client exists, and MLflow's "View run … at: URL"
lines are switched off, so no password reaches output, params, tags or sweep.json (the URI is also masked
wherever it is printed or recorded, for tokens in a query string).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import unquote, urlsplit, urlunsplit

from filelock import FileLock, Timeout
from mlflow import MlflowClient
from mlflow.entities import Param, Run, RunStatus, RunTag, ViewType

from dashboards.commands import mlflow_ui_words, shell_join
from trainable.errors import ConfigError

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
PROBE_TIMEOUT_S = "10"
STORE_LOCK_TIMEOUT_S = 300      # a second driver waits this long for the first to create the embedded store
USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
CREDENTIAL_ENVS = (USERNAME_ENV, PASSWORD_ENV, "MLFLOW_TRACKING_TOKEN")
PARENT_RUN_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
# MLflow caps a param value at 6000 characters; longer ones (e.g. a long --arms list) are cut with a marker.
MAX_PARAM_CHARS = 6000

_USERINFO = re.compile(r"(?<=://)([^:/@\s]+):([^@/\s]+)@")
_SECRET_QUERY = re.compile(
    r"(?i)([?&;][\w.-]*(?:token|password|pwd|secret|key|sig|signature|credential)[\w.-]*=)[^&;\s]+")


def mask_secrets(text: str) -> str:
    """Hide the password of user:password@ and token-like query values in a URI before printing or logging."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1:***@", text))


def resolve_tracking_uri(cli_uri: str | None, out: Path) -> str:
    """--mlflow-uri, else MLFLOW_TRACKING_URI, else a SQLite file in the output folder; a server URI's
    `user:password@` moved into MLflow's credential variables (see credentials_from_uri)."""
    # MLflow prints "View run <name> at: <tracking URI>/#/…" whenever a run against a server ends: off.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return credentials_from_uri(uri)
    return f"sqlite:///{(out.expanduser().resolve() / DB_FILE).as_posix()}"


def credentials_from_uri(uri: str) -> str:
    """The http(s) URI without its userinfo, which goes to MLFLOW_TRACKING_USERNAME/_PASSWORD (how MLflow's REST
    client authenticates); other URIs (e.g. postgresql://, whose driver needs the password) unchanged."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    userinfo, host = parts.netloc.rsplit("@", 1)
    username, _, password = userinfo.partition(":")
    os.environ[USERNAME_ENV] = unquote(username)
    if password:
        os.environ[PASSWORD_ENV] = unquote(password)
    plain = urlunsplit(parts._replace(netloc=host))
    if os.environ.get("MLFLOW_TRACKING_URI") == uri:     # MLflow reads the variable itself, e.g. in mlflow.pytorch
        os.environ["MLFLOW_TRACKING_URI"] = plain
    return plain


@contextlib.contextmanager
def credentials_hidden() -> Iterator[None]:
    """Tracking credentials out of the environment meanwhile: a local Ray started now passes its environment to
    every trial worker, and trials never talk to MLflow."""
    saved = {key: os.environ.pop(key) for key in CREDENTIAL_ENVS if key in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:")


def artifact_location(uri: str, out: Path) -> str | None:
    """Artifacts of the embedded store go beside it; a tracking server decides its own."""
    return (out.expanduser().resolve() / ARTIFACTS_DIR).as_uri() if is_embedded(uri) else None


def ui_command(uri: str) -> str:
    """How to browse the store, as a command that runs as pasted (this environment's mlflow)."""
    if is_embedded(uri):
        return shell_join(mlflow_ui_words(uri))
    return f"open {mask_secrets(uri)} in a browser (the tracking server serves the UI)"


@contextlib.contextmanager
def _quick_failure() -> Iterator[None]:
    # MLflow retries an unreachable server for minutes by default; the start-up probe should fail in seconds.
    saved = {key: os.environ.get(key) for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=PROBE_TIMEOUT_S)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def connect(uri: str) -> MlflowClient:
    """A client for the store, after checking that it answers; an embedded SQLite store is created (schema
    migrations included) by one process at a time, so two drivers starting on a fresh --out cannot leave it
    half-migrated."""
    if not is_embedded(uri):
        return _open_store(uri)
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial tables..."
    try:
        with FileLock(f"{db}.lock", timeout=STORE_LOCK_TIMEOUT_S):
            return _open_store(uri)
    except Timeout:
        raise ConfigError(f"{db}: another process has been creating this MLflow store for over "
                          f"{STORE_LOCK_TIMEOUT_S} s (it holds {db}.lock); try again when it is done") from None


def _open_store(uri: str) -> MlflowClient:
    with _quick_failure():
        try:
            # MLflow opens (and creates or migrates) a SQL store in the constructor: inside the try, too
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 - any failure here means "cannot use this store"
            text = str(err).strip()
            reason = mask_secrets(text.splitlines()[0] if text else type(err).__name__)[:300]
            if is_embedded(uri):
                raise ConfigError(f"{uri.removeprefix('sqlite:///')}: the embedded MLflow store cannot be opened "
                                  f"({type(err).__name__}: {reason}); move the file away to start a new store, "
                                  f"or pass --mlflow-uri") from None
            raise ConfigError(f"--mlflow-uri {mask_secrets(uri)}: the MLflow tracking store does not answer "
                              f"({reason}); start the server or pass another --mlflow-uri") from None
    return client


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


class SweepRun:
    """The sweep's MLflow experiment (named after the sweep) and its parent run."""

    def __init__(self, client: MlflowClient, experiment_id: str, parent_run_id: str):
        self.client = client
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id

    @classmethod
    def start(cls, client: MlflowClient, name: str, *, artifact_root: str | None, params: Mapping[str, Any],
              tags: Mapping[str, Any], replace: bool = False) -> "SweepRun":
        experiment_id = _experiment(client, name, artifact_root)
        if replace:  # --overwrite: the earlier sweep's runs go to MLflow's trash, not into this sweep's view
            for run in client.search_runs([experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=50000):
                client.delete_run(run.info.run_id)
        run = client.create_run(experiment_id, run_name=name, tags={k: str(v) for k, v in tags.items()})
        client.log_batch(run.info.run_id, params=[_param(k, v) for k, v in params.items()])
        return cls(client, experiment_id, run.info.run_id)

    @classmethod
    def reopen(cls, client: MlflowClient, name: str, experiment_id: str, parent_run_id: str,
               uri: str) -> "SweepRun":
        """The parent run of a sweep being resumed, RUNNING again."""
        run = recorded_parent_run(client, name, experiment_id, parent_run_id, uri)
        resumes = int(run.data.tags.get("resumes", "0")) + 1
        client.update_run(parent_run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        client.set_tag(parent_run_id, "resumes", str(resumes))
        return cls(client, experiment_id, parent_run_id)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.parent_run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_text(self, text: str, file_name: str) -> None:
        self.client.log_text(self.parent_run_id, text, file_name)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.parent_run_id, status=status)


def recorded_parent_run(client: MlflowClient, name: str, experiment_id: str, parent_run_id: str, uri: str) -> Run:
    """The parent run sweep.json names, checked to be a run of the sweep's own experiment."""
    try:
        run = client.get_run(parent_run_id)
        experiment = client.get_experiment(run.info.experiment_id)
    except Exception:  # noqa: BLE001 - MLflow raises its own exception types per store
        run = experiment = None
    if run is None or run.info.experiment_id != experiment_id or experiment.name != name:
        raise ConfigError(f"--resume {name}: its parent run {parent_run_id} is not in the MLflow store "
                          f"{mask_secrets(uri)}; resume with the --mlflow-uri the sweep started with")
    return run


def _experiment(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_root)
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id
