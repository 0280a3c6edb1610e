"""The team's tracking server for real: `mlflow server` started by deploy/mlflow/serve.sh on a throwaway PostgreSQL
cluster (initdb + pg_ctl in a temporary folder, on a free port) with a local artifact store, and two small
ablation sweeps (`python sweeps/run_ablation.py`, each with its own local Ray) run against it at the same time:
both complete, each in its own experiment with its own parent run and child run, stored in PostgreSQL."""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
SERVE = REPO / "deploy" / "mlflow" / "serve.sh"
TINY = ["--arms", "baseline", "--seeds", "1", "--epochs", "1", "--set", "backbone=test_resnet", "--set",
        "image_size=32", "--set", "pretrained=none", "--set", "batch_size=16", "--cpus-per-trial", "1"]
START_TIMEOUT_S, SWEEP_TIMEOUT_S = 600, 900

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def postgres_user() -> tuple[int | None, int | None]:
    """PostgreSQL refuses to run as root: there, its commands run as the `postgres` user (else `nobody`)."""
    if os.geteuid() != 0:
        return None, None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
    pytest.skip("running as root with neither a `postgres` nor a `nobody` user to run PostgreSQL as")


@pytest.fixture(scope="module")
def postgres():
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb on PATH nor in /usr/lib/postgresql/*/bin); "
                    "`apt-get install postgresql` (as .ci/run does) to run this test")
    uid, gid = postgres_user()
    # Not under pytest's tmp folder: that is private to this user, and the server may run as another one.
    folder = Path(tempfile.mkdtemp(prefix="cxr-postgres-"))
    if uid is not None:
        os.chown(folder, uid, gid)
    port, data = free_port(), folder / "data"

    def pg(*command: str) -> None:
        subprocess.run([str(bin_dir / command[0]), *command[1:]], check=True, capture_output=True, text=True,
                       timeout=START_TIMEOUT_S, user=uid, group=gid, cwd=folder)

    try:
        pg("initdb", "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8")
        pg("pg_ctl", "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", str(START_TIMEOUT_S), "-o",
           f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow")
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        if (data / "postmaster.pid").exists():
            pg("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def tracking_server(postgres, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    # One worker: uvicorn's multi-process supervisor restarts workers that miss its health pings, which on a
    # loaded machine can be every one of them.
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": postgres, "MLFLOW_ARTIFACTS_DESTINATION": str(folder / "artifacts"),
           "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1",
           "MLFLOW": str(Path(sys.executable).parent / "mlflow"),
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}      # no GenAI job workers: processes nothing here uses
    with open(folder / "server.log", "w") as log:
        server = subprocess.Popen(["bash", str(SERVE)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (folder / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer in time"
            time.sleep(1)
        yield {"uri": uri, "postgres": postgres, "artifacts": folder / "artifacts"}
    finally:
        if server.poll() is None:       # a throwaway server: no graceful shutdown to wait for
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=60)


def test_two_sweeps_at_once_against_one_postgres_backed_server(tracking_server, synthetic_dir, tmp_path):
    uri = tracking_server["uri"]
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
           "CXR_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    names = ["team-a", "team-b"]
    sweeps = {name: subprocess.Popen([sys.executable, str(REPO / "sweeps" / "run_ablation.py"), "--data",
                                      str(synthetic_dir), "--out", str(tmp_path / name), "--name", name,
                                      "--mlflow-uri", uri, *TINY], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
              for name in names}
    for name, sweep in sweeps.items():
        output, _ = sweep.communicate(timeout=SWEEP_TIMEOUT_S)
        print(name, output[-4000:], sep="\n")      # shown by pytest when the test fails
        assert sweep.returncode == 0, name

    client = MlflowClient(uri)
    parents = {}
    for name in names:
        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert parent.info.status == child.info.status == "FINISHED"
        assert child.info.run_name == "baseline-s0" and 0 <= child.data.metrics["val_auc_mean"] <= 1
        # the validation predictions went through the server's proxy into its artifact store
        assert "val_predictions.npz" in {a.path for a in client.list_artifacts(child.info.run_id)}
        parents[name] = parent
    assert len(list(tracking_server["artifacts"].rglob("val_predictions.npz"))) == 2
    # they ran at once: each sweep's parent run started before the other's ended
    a, b = (parents[name].info for name in names)
    assert a.start_time < b.end_time and b.start_time < a.end_time
    # and PostgreSQL holds them
    with psycopg.connect(tracking_server["postgres"]) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT e.name, count(*) FROM runs r JOIN experiments e USING (experiment_id) "
                       "WHERE e.name = ANY(%s) GROUP BY e.name", (names,))
        assert dict(cursor.fetchall()) == {name: 2 for name in names}
