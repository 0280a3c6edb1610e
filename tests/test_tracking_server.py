"""A real `mlflow server --app-name basic-auth` on 127.0.0.1, and the sweep and train_best run against it as users
run them (subprocesses), with the password in `--mlflow-uri http://admin:PASSWORD@127.0.0.1:PORT`:

  no secret anywhere    everything they print (stdout, stderr), every file under their --out, Ray's logs, and
                        every param, tag, artifact, logged and registered model in the server's store
  one driver per sweep  a second driver of the same sweep, started while the first runs, is refused in one line
  one store creation    two processes opening a fresh embedded SQLite store create it one after the other, and
                        a broken store is one error line

The tiny sweep (1 arm x 1 seed, 1 epoch, test_resnet at 32 px) and train_best (1 epoch) cost about a minute.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.store.db.utils import _get_latest_schema_revision

REPO = Path(__file__).resolve().parents[1]
USER, PASSWORD = "admin", f"pw-{secrets.token_urlsafe(12)}"
TINY = ["--set", "backbone=test_resnet", "--set", "pretrained=none", "--set", "image_size=32",
        "--set", "batch_size=16", "--cpus-per-trial", "1"]
NAME = "secured"
START_TIMEOUT_S = 180
RUN_TIMEOUT_S = 600

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _credentials():
    """This test process reads the store with MLflow's own credential variables, restored afterwards."""
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=PASSWORD)
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL without credentials, server root): basic auth, READ for anonymous users, artifacts served."""
    root = tmp_path_factory.mktemp("mlflow_server")
    (root / "auth.ini").write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root / 'auth.db'}\n"
                                   f"admin_username = {USER}\n"
                                   f"authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = _free_port()
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}     # no GenAI job workers: eight fewer processes
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    with open(root / "server.log", "w") as log:
        process = subprocess.Popen([str(mlflow_cli), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
                                    "--port", str(port), "--workers", "1",
                                    "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                                    "--artifacts-destination", str(root / "artifacts")],
                                   env=env, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the MLflow server did not start in time"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url, root
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def _env(cache: Path, ray_tmp: str) -> dict:
    variables = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING"))}
    return {**variables, "CXR_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": ray_tmp}


def _script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "sweeps" / name), *args]


@pytest.fixture(scope="module")
def secured(server, synthetic_dir, tmp_path_factory):
    """The sweep (and, while it runs, a second driver of the same sweep), then train_best from it."""
    url, _ = server
    root = tmp_path_factory.mktemp("secured")
    ray_tmp = tempfile.mkdtemp(prefix="ray")       # short: Ray's socket paths must stay under 108 characters
    env = _env(root / "cache", ray_tmp)
    secret_uri = url.replace("http://", f"http://{USER}:{PASSWORD}@")
    sweep_args = ["--data", str(synthetic_dir), "--out", str(root / "out"), "--name", NAME, "--arms", "baseline",
                  "--seeds", "1", "--epochs", "1", "--mlflow-uri", secret_uri, *TINY]
    logs = {}
    with open(root / "sweep.out", "w") as stdout, open(root / "sweep.err", "w") as stderr:
        sweep = subprocess.Popen(_script("run_ablation.py", *sweep_args), cwd=REPO, env=env, stdout=stdout,
                                 stderr=stderr, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while f"ablation '{NAME}':" not in (root / "sweep.out").read_text():   # printed once the lock is held
            assert sweep.poll() is None and time.monotonic() < deadline, (root / "sweep.err").read_text()[-3000:]
            time.sleep(0.2)
        second = subprocess.run(_script("run_ablation.py", *sweep_args), cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=RUN_TIMEOUT_S)
        still_running = sweep.poll() is None
        code = sweep.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
    logs["sweep"] = ((root / "sweep.out").read_text(), (root / "sweep.err").read_text())
    logs["second driver"] = (second.stdout, second.stderr)
    final = subprocess.run(_script("train_best.py", "--from-sweep", NAME, "--mlflow-uri", secret_uri, "--epochs", "1",
                                   "--out", str(root / "final"), "--bootstrap", "20", "--gradcam-samples", "0",
                                   "--registered-model", "secured-model"),
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    logs["train_best"] = (final.stdout, final.stderr)
    for name, (out, err) in logs.items():
        print(f"--- {name}", out[-3000:], err[-3000:], sep="\n")      # shown by pytest when a test fails
    yield {"root": root, "ray_tmp": Path(ray_tmp), "logs": logs, "url": url, "codes": (code, second.returncode,
                                                                                      final.returncode),
           "second_overlapped": still_running}
    subprocess.run(["rm", "-rf", ray_tmp], check=False)


def _store_dump(url: str, download_to: Path) -> str:
    """Every experiment, run (params, tags), artifact (downloaded), logged and registered model of the server."""
    with _credentials():
        client = MlflowClient(url)
        parts = []
        experiments = client.search_experiments()
        for experiment in experiments:
            parts.append(json.dumps([experiment.name, experiment.artifact_location, experiment.tags]))
            for run in client.search_runs([experiment.experiment_id]):
                parts.append(json.dumps([run.info.run_name, run.data.params, run.data.tags]))
                client.download_artifacts(run.info.run_id, "", str(download_to / run.info.run_id))
        for model in client.search_logged_models([e.experiment_id for e in experiments]):
            parts.append(json.dumps([model.name, model.params, model.tags, model.artifact_location]))
        for registered in client.search_registered_models():
            parts.append(json.dumps([registered.name, registered.description, registered.tags]))
            for version in client.search_model_versions(f"name = '{registered.name}'"):
                parts.append(json.dumps([version.source, version.description, version.tags, version.run_link]))
    return "\n".join(parts)


def test_sweep_and_train_best_really_use_the_password_protected_server(secured):
    code, _, final_code = secured["codes"]
    assert (code, final_code) == (0, 0)
    with _credentials():
        client = MlflowClient(secured["url"])
        experiment = client.get_experiment_by_name(NAME)
        runs = client.search_runs([experiment.experiment_id])
        assert sorted(r.info.run_name for r in runs) == sorted([NAME, "baseline-s0"])
        assert {r.info.status for r in runs} == {"FINISHED"}
        parent = next(r for r in runs if r.info.run_name == NAME)
        assert "tune_state_sha256" in parent.data.tags      # the resume digests live on the server too
        [version] = client.search_model_versions("name = 'secured-model'")
        assert client.get_run(version.run_id).data.tags["source_sweep"] == NAME
    # without credentials the server refuses to write: the password is what let the sweep log
    request = urllib.request.Request(f"{secured['url']}/api/2.0/mlflow/experiments/create",
                                     data=json.dumps({"name": "anonymous"}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError, match="401|403"):
        urllib.request.urlopen(request, timeout=10)


def test_no_secret_reaches_output_files_logs_or_the_store(secured, tmp_path):
    needles = [PASSWORD.encode(), base64.b64encode(f"{USER}:{PASSWORD}".encode())]
    haystacks = {f"{name} {stream}": text.encode() for name, (out, err) in secured["logs"].items()
                 for stream, text in (("stdout", out), ("stderr", err))}
    for folder in (secured["root"], secured["ray_tmp"]):          # both --outs, their caches, Ray's logs
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink() and not path.is_socket():
                haystacks[str(path)] = path.read_bytes()
    haystacks["MLflow store"] = _store_dump(secured["url"], tmp_path).encode()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            haystacks[f"artifact {path.relative_to(tmp_path)}"] = path.read_bytes()
    assert len(haystacks) > 50 and any("raylet" in name for name in haystacks)
    leaks = [name for name, data in haystacks.items() if any(needle in data for needle in needles)]
    assert leaks == []
    # MLflow's own "View run … at: URL" lines are off; the sweep prints where to look, without credentials
    printed = "".join(out + err for out, err in secured["logs"].values())
    assert "View run" not in printed and f"open {secured['url']} in a browser" in printed


def test_a_second_driver_of_a_running_sweep_is_refused_in_one_line(secured):
    _, second_code, _ = secured["codes"]
    assert secured["second_overlapped"], "the first sweep ended before the second driver was refused"
    assert second_code == 2
    _, stderr = secured["logs"]["second driver"]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr
    assert re.fullmatch(rf"error: sweep '{NAME}' is being run by another driver right now \(it holds "
                        rf"{re.escape(str(secured['root'] / 'out' / f'.{NAME}.lock'))}\); wait for it to end \(or stop "
                        rf"it\), or pick another --name", errors[0]), errors[0]
    with _credentials():
        client = MlflowClient(secured["url"])
        runs = client.search_runs([client.get_experiment_by_name(NAME).experiment_id])
    assert sum("mlflow.parentRunId" not in r.data.tags for r in runs) == 1        # one parent run, not two


OPEN_STORE = "import sys; from dashboards.mlflow_store import connect; connect(sys.argv[1]); print('opened')"


def test_two_drivers_on_a_fresh_out_create_the_embedded_store_one_after_the_other(tmp_path):
    """Two processes open a fresh embedded store at once, as two drivers starting on a fresh --out do (the same
    dashboards.mlflow_store.connect, without the rest of a driver's start-up): before, one of them died in the other's
    half-done schema migration and left the store unusable."""
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    openers = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, uri], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for opener in openers:
        stdout, stderr = opener.communicate(timeout=RUN_TIMEOUT_S)
        assert (opener.returncode, stdout.strip()) == (0, "opened"), stderr[-3000:]
    # complete: the schema at MLflow's newest revision, and a store a third process can use
    with sqlite3.connect(tmp_path / "out" / "mlflow.db") as db:
        [(revision,)] = db.execute("select version_num from alembic_version").fetchall()
    assert revision == _get_latest_schema_revision()
    MlflowClient(uri).search_experiments()


def test_a_broken_embedded_store_is_one_error_line(tmp_path):
    """What a half-migrated or foreign file in --out meets: one line naming the file (before: a traceback)."""
    from dashboards.mlflow_store import connect
    from trainable.errors import ConfigError
    store = tmp_path / "mlflow.db"
    with sqlite3.connect(store) as db:      # a schema revision MLflow does not know, as a migration cut short
        db.execute("create table alembic_version (version_num varchar(32) not null)")
        db.execute("insert into alembic_version values ('0123456789ab')")
    with pytest.raises(ConfigError) as caught:
        connect(f"sqlite:///{store}")
    message = str(caught.value)
    assert message.startswith(f"{store}: the embedded MLflow store cannot be opened (") and "\n" not in message
    assert message.endswith("move the file away to start a new store, or pass --mlflow-uri")
