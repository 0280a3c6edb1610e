"""The team's tracking server for real, as deploy/mlflow/serve.sh runs it: `mlflow server --app-name basic-auth` on
127.0.0.1, backed by a throwaway PostgreSQL cluster (initdb + pg_ctl in a temporary folder, on a free port; where
PostgreSQL is not installed, an SQLite file, and the PostgreSQL check skips saying so), artifacts in a store the
server proxies. Two sweeps and train_best run against it as users run them (subprocesses), with the password in
`--mlflow-uri http://admin:PASSWORD@127.0.0.1:PORT`:

  two sweeps at once    both complete, each in its own experiment with its own parent and child run, their
                        artifacts through the server's proxy, their runs in PostgreSQL
  no secret anywhere    everything they print (stdout, stderr), every file under their --out, Ray's logs, and
                        every param, tag, artifact, logged and registered model in the server's store
  one driver per sweep  a second driver of the same sweep, started while the first runs, is refused in one line
  one store creation    two processes opening a fresh embedded SQLite store create it one after the other, and
                        a broken store is one error line

The tiny sweeps (1 arm x 1 seed, 1 epoch, test_resnet at 32 px) and train_best (1 epoch) cost about a minute each.
"""
from __future__ import annotations

import base64
import contextlib
import glob
import json
import os
import pwd
import re
import secrets
import shutil
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

import psycopg
import pytest
from mlflow import MlflowClient
from mlflow.store.db.utils import _get_latest_schema_revision

REPO = Path(__file__).resolve().parents[1]
SERVE = REPO / "deploy" / "mlflow" / "serve.sh"
USER, PASSWORD = "admin", f"pw-{secrets.token_urlsafe(12)}"
TINY = ["--set", "backbone=test_resnet", "--set", "pretrained=none", "--set", "image_size=32",
        "--set", "batch_size=16", "--cpus-per-trial", "1"]
NAME, OTHER = "secured", "team-b"          # the sweep under test, and a second team's sweep at the same time
START_TIMEOUT_S = 600
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


def postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def postgres_user() -> tuple[int | None, int | None] | None:
    """PostgreSQL refuses to run as root: there, its commands run as the `postgres` user (else `nobody`)."""
    if os.geteuid() != 0:
        return None, None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
    return None


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """(the server's backend store URI, why it is not PostgreSQL or None)."""
    bin_dir, user = postgres_bin(), postgres_user()
    if bin_dir is None or user is None:
        why = ("PostgreSQL is not installed (no initdb on PATH nor in /usr/lib/postgresql/*/bin); `apt-get install "
               "postgresql` (as .ci/run does) to run this check" if bin_dir is None else
               "running as root with neither a `postgres` nor a `nobody` user to run PostgreSQL as")
        yield f"sqlite:///{tmp_path_factory.mktemp('backend') / 'mlflow.db'}", why
        return
    uid, gid = user
    # Not under pytest's tmp folder: that is private to this user, and the server may run as another one.
    folder = Path(tempfile.mkdtemp(prefix="cxr-postgres-"))
    if uid is not None:
        os.chown(folder, uid, gid)
    port, data = _free_port(), folder / "data"

    def pg(*command: str) -> None:
        subprocess.run([str(bin_dir / command[0]), *command[1:]], check=True, capture_output=True, text=True,
                       timeout=START_TIMEOUT_S, user=uid, group=gid, cwd=folder)

    try:
        pg("initdb", "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8")
        pg("pg_ctl", "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", str(START_TIMEOUT_S), "-o",
           f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow")
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow", None
    finally:
        if (data / "postmaster.pid").exists():
            pg("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def server(backend, tmp_path_factory):
    """(base URL without credentials, server root): deploy/mlflow/serve.sh with basic auth, READ for anonymous
    users, artifacts served."""
    root = tmp_path_factory.mktemp("mlflow_server")
    (root / "auth.ini").write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root / 'auth.db'}\n"
                                   f"admin_username = {USER}\n"
                                   f"authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = _free_port()
    # One worker: uvicorn's multi-process supervisor restarts workers that miss its health pings, which on a
    # loaded machine can be every one of them. No GenAI job workers: eight processes nothing here uses.
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": backend[0], "MLFLOW_ARTIFACTS_DESTINATION": str(root / "artifacts"),
           "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1",
           "MLFLOW": str(Path(sys.executable).with_name("mlflow")),
           "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(root / "server.log", "w") as log:
        process = subprocess.Popen(["bash", str(SERVE)], env=env, stdout=log, stderr=log, start_new_session=True)
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
    """The sweep and, at the same time, another team's sweep and a second driver of the first sweep; then
    train_best from the first."""
    url, _ = server
    root = tmp_path_factory.mktemp("secured")
    ray_tmp = tempfile.mkdtemp(prefix="ray")       # short: Ray's socket paths must stay under 108 characters
    env = _env(root / "cache", ray_tmp)            # one image cache, shared by both sweeps
    secret_uri = url.replace("http://", f"http://{USER}:{PASSWORD}@")

    def args(name: str) -> list[str]:
        return ["--data", str(synthetic_dir), "--out", str(root / ("out" if name == NAME else name)), "--name", name,
                "--arms", "baseline", "--seeds", "1", "--epochs", "1", "--mlflow-uri", secret_uri, *TINY]

    sweeps = {}
    for name in (NAME, OTHER):
        with open(root / f"{name}.out", "w") as stdout, open(root / f"{name}.err", "w") as stderr:
            sweeps[name] = subprocess.Popen(_script("run_ablation.py", *args(name)), cwd=REPO, env=env,
                                            stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while f"ablation '{NAME}':" not in (root / f"{NAME}.out").read_text():   # printed once the lock is held
            assert sweeps[NAME].poll() is None and time.monotonic() < deadline, \
                (root / f"{NAME}.err").read_text()[-3000:]
            time.sleep(0.2)
        second = subprocess.run(_script("run_ablation.py", *args(NAME)), cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=RUN_TIMEOUT_S)
        still_running = sweeps[NAME].poll() is None
        codes = {name: sweep.wait(timeout=max(1.0, deadline - time.monotonic())) for name, sweep in sweeps.items()}
    finally:
        for sweep in sweeps.values():
            if sweep.poll() is None:
                os.killpg(sweep.pid, signal.SIGKILL)
                sweep.wait()
    logs = {name: ((root / f"{name}.out").read_text(), (root / f"{name}.err").read_text()) for name in sweeps}
    logs["second driver"] = (second.stdout, second.stderr)
    final = subprocess.run(_script("train_best.py", "--from-sweep", NAME, "--mlflow-uri", secret_uri, "--epochs", "1",
                                   "--out", str(root / "final"), "--bootstrap", "20", "--gradcam-samples", "0",
                                   "--registered-model", "secured-model"),
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    logs["train_best"] = (final.stdout, final.stderr)
    for name, (out, err) in logs.items():
        print(f"--- {name}", out[-3000:], err[-3000:], sep="\n")      # shown by pytest when a test fails
    yield {"root": root, "ray_tmp": Path(ray_tmp), "logs": logs, "url": url, "artifacts": server[1] / "artifacts",
           "codes": (codes[NAME], second.returncode, final.returncode), "other_code": codes[OTHER],
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


def test_two_sweeps_at_once_each_with_its_own_parent_run_and_artifacts(secured):
    assert secured["codes"][0] == secured["other_code"] == 0
    with _credentials():
        client = MlflowClient(secured["url"])
        parents = {}
        for name in (NAME, OTHER):
            runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
            (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
            (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
            assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert parent.info.status == child.info.status == "FINISHED"
            assert child.info.run_name == "baseline-s0" and 0 <= child.data.metrics["val_auc_mean"] <= 1
            # the validation predictions went through the server's proxy into its artifact store
            assert "val_predictions.npz" in {a.path for a in client.list_artifacts(child.info.run_id)}
            assert [p for p in secured["artifacts"].rglob("val_predictions.npz") if child.info.run_id in p.parts]
            parents[name] = parent
    # they ran at once: each sweep's parent run started before the other's ended
    a, b = (parents[name].info for name in (NAME, OTHER))
    assert a.start_time < b.end_time and b.start_time < a.end_time


def test_postgresql_holds_the_runs(backend, secured):
    uri, not_postgres = backend
    if not_postgres:
        pytest.skip(not_postgres)
    with psycopg.connect(uri) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT e.name, count(*) FROM runs r JOIN experiments e USING (experiment_id) "
                       "WHERE e.name = ANY(%s) GROUP BY e.name", ([NAME, OTHER],))
        assert dict(cursor.fetchall()) == {NAME: 2, OTHER: 2}


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
