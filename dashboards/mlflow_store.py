"""Which MLflow store a sweep uses and whether it answers: opened the same way by the sweeps that write it and
the reports that read it, with the names both use for its files and tags.

The embedded default is one SQLite file written only by the driver (see sweeps/mlflow_logger), so it never has
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
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

from filelock import FileLock, Timeout
from mlflow import MlflowClient
from mlflow.entities import RunStatus

from trainable.errors import ConfigError

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
PROBE_TIMEOUT_S = "10"
STORE_LOCK_TIMEOUT_S = 300      # a second driver waits this long for the first to create the embedded store
USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
CREDENTIAL_ENVS = (USERNAME_ENV, PASSWORD_ENV, "MLFLOW_TRACKING_TOKEN")
PARENT_RUN_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
# What wrote a parent run: a sweep (ablation or search; tag `kind` says which) or a final training. Readers that list
# sweeps skip final runs by it; a parent run without the tag (written before it existed) counts as a sweep.
RUN_TYPE_TAG = "run_type"
SWEEP_RUN, FINAL_RUN = "sweep", "final"
RUNNING, FINISHED, FAILED, KILLED = (RunStatus.to_string(s) for s in
                                     (RunStatus.RUNNING, RunStatus.FINISHED, RunStatus.FAILED, RunStatus.KILLED))

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


def connect(uri: str, *, create: bool = True) -> MlflowClient:
    """A client for the store, after checking that it answers; an embedded SQLite store is created (schema
    migrations included) by one process at a time, so two drivers starting on a fresh --out cannot leave it
    half-migrated. Readers pass create=False: a missing SQLite file is then an error, not a new empty store."""
    if not is_embedded(uri):
        return _open_store(uri)
    db = Path(uri.removeprefix("sqlite:///"))
    if not create and not db.is_file():
        raise ConfigError(f"--mlflow-uri {uri}: no such SQLite file")
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
