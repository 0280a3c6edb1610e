"""On real Ray clusters on this machine: two raylets (one with a GPU resource but, as here, no usable CUDA device),
and a `ray start --head` that wants token authentication. The checks that run once Ray is up refuse a sweep
without shared storage and one asking more GPUs per trial than any node has; a trial placed on the GPU node fails
in one line naming the node; the driver builds each node's image cache once, before the trials, which then only
map it; joining the token cluster without its token is one `error:` line, in seconds."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient
from ray.cluster_utils import Cluster

from sweeps import cache_warmup, runner
from sweeps.ablation import Ablation
from sweeps.runner import main
from trainable.data.cache import read_manifest
from trainable.data.synthetic import generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node_caches(tmp_path_factory):
    """Each node's own cache folder ($CXR_CACHE_DIR of its raylet, inherited by its workers), as on two machines."""
    root = tmp_path_factory.mktemp("node_caches")
    return [root / "head", root / "worker"]


@pytest.fixture(scope="module")
def two_nodes(node_caches):
    # Ray 2.60 turns token authentication on for a local ray.init() in process-wide native config, which outlives
    # ray.shutdown(): after an earlier test's local Ray in this process, actors (not tasks) created on a new
    # cluster die before they start. A fresh CLI process never meets this; here Ray's own test helper resets it.
    from ray._private.authentication_test_utils import reset_auth_token_state
    reset_auth_token_state()
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "env_vars": {"CXR_CACHE_DIR": str(node_caches[0])}})
    # a GPU the node advertises; torch here finds no CUDA device
    cluster.add_node(num_cpus=1, num_gpus=1, env_vars={"CXR_CACHE_DIR": str(node_caches[1])})
    yield cluster.address
    cluster.shutdown()


def sweep_args(synthetic_dir, out, address, *extra):
    return ["--data", str(synthetic_dir), "--out", str(out), "--name", "mn", "--arms", "baseline", "--seeds", "1",
            "--address", address, "--set", "backbone=test_resnet", "--set", "pretrained=none", *extra]


def assert_no_sweep_logged(out: Path) -> None:
    """Nothing of sweep `mn` in --out's embedded store: no store at all (opening one would create it, a few seconds
    of schema migrations), or one without the sweep's experiment."""
    store = out / "mlflow.db"
    assert not store.exists() or MlflowClient(f"sqlite:///{store}").get_experiment_by_name("mn") is None


def test_multi_node_sweep_without_storage_is_refused_with_the_fix(two_nodes, synthetic_dir, tmp_path, capsys):
    assert main(Ablation, sweep_args(synthetic_dir, tmp_path, two_nodes)) == 2
    error = capsys.readouterr().err
    assert "this Ray cluster has 2 nodes but no --storage was given" in error
    assert "--storage /shared/path" in error and "s3://" in error
    assert not ray.is_initialized()
    assert_no_sweep_logged(tmp_path)


def test_shared_storage_passes_and_more_gpus_than_any_node_has_is_refused(two_nodes, synthetic_dir, tmp_path,
                                                                         capsys):
    # Both raylets share this machine's disk, so the storage probe passes; the GPU check after it stops the sweep.
    args = sweep_args(synthetic_dir, tmp_path, two_nodes, "--storage", str(tmp_path / "shared"), "--gpus-per-trial", "2")
    assert main(Ablation, args) == 2
    error = capsys.readouterr().err
    assert "--gpus-per-trial 2: no node of this Ray cluster has that many GPUs (largest node: 1" in error
    assert not ray.is_initialized()
    assert_no_sweep_logged(tmp_path)


def test_a_trial_given_a_gpu_on_a_node_without_cuda_fails_in_one_line_naming_the_node(two_nodes, synthetic_dir,
                                                                                     tmp_path, capsys):
    args = sweep_args(synthetic_dir, tmp_path, two_nodes, "--storage", str(tmp_path / "shared"), "--gpus-per-trial",
                      "1", "--max-failures", "0", "--epochs", "1", "--set", "image_size=32")
    assert main(Ablation, args) == 1                      # a node problem, not bad input
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = [r for r in client.search_runs([client.get_experiment_by_name("mn").experiment_id])
             if r.info.run_name == "baseline-s0"]
    assert run.info.status == "FAILED"
    error = run.data.tags["error"]
    assert re.search(rf"DeviceUnavailable: node {re.escape(socket.gethostname())} \([\d.]+\): this trial was given 1 "
                     rf"GPU\(s\) but torch \S+ \(CUDA build \S+\) sees no usable CUDA device \(.*\); fix the node's "
                     rf"NVIDIA driver or run with --gpus-per-trial 0$", error), error
    assert client.get_metric_history(run.info.run_id, "val_auc_mean") == []



def test_a_cluster_that_cannot_start_the_sweeps_actor_stops_it_before_anything_is_written(two_nodes, synthetic_dir,
                                                                                          tmp_path, capsys,
                                                                                          monkeypatch):
    """The no-retry registry is the sweep's first actor. Where it dies at start (as on a node whose workers cannot
    import the project), the sweep stops in one error line before its parent run and Tune, rather than running
    with deterministic failures retried again."""
    @ray.remote(num_cpus=0)
    class DiesAtStart:
        def __init__(self):
            raise ImportError("No module named 'trainable'")

        def take(self):
            return {}

    monkeypatch.setattr("sweeps.failures.FailureRegistry", DiesAtStart)
    storage = tmp_path / "shared"
    assert main(Ablation, sweep_args(synthetic_dir, tmp_path, two_nodes, "--storage", str(storage))) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and re.fullmatch(
        r"error: this Ray cluster could not start the sweep's actor cxr-ablate-failures-mn \(ActorDiedError: "
        r"ImportError: No module named 'trainable'; waited up to 120 s\); trials are actors too and would fail the "
        r"same way: check `ray status` and the Ray logs of the cluster's nodes", lines[0]), lines
    assert not ray.is_initialized()
    assert_no_sweep_logged(tmp_path)
    assert not (storage / "mn" / "sweep.json").exists()


# --- a cluster with token authentication ---------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def token_cluster():
    """`ray start --head --block` with RAY_AUTH_MODE=token and a token of its own, in its own process group (so
    only its processes are stopped), its own short temp folder; yields its address."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="cxr-ray-")           # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex()}
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             f"--port={port}", "--num-cpus=1", "--include-dashboard=false", f"--temp-dir={temp_dir}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the token-auth head did not come up"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        time.sleep(2)                                   # the GCS answers RPCs a moment after it listens
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGKILL)             # a throwaway cluster: no graceful 30 s shutdown needed
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_joining_a_token_cluster_without_its_token_is_one_error_line_with_the_fix(token_cluster, synthetic_dir,
                                                                                 tmp_path, capsys, monkeypatch):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    started = time.monotonic()
    assert main(Ablation, sweep_args(synthetic_dir, tmp_path, token_cluster)) == 2
    assert time.monotonic() - started < 15           # Ray's own connect retries for ~20 s, then a traceback
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert lines == [f"error: --address {token_cluster}: this Ray cluster needs token authentication and the token "
                     f"is missing or wrong; export RAY_AUTH_MODE=token and the cluster's token as RAY_AUTH_TOKEN (or "
                     f"in ~/.ray/auth_token, or a file named by RAY_AUTH_TOKEN_PATH); `ray get-auth-token` on the "
                     f"head node prints it"], lines
    assert not ray.is_initialized()
    assert_no_sweep_logged(tmp_path)


def test_the_driver_builds_each_nodes_cache_once_and_no_trial_rebuilds_it(two_nodes, node_caches, synthetic_dir,
                                                                          tmp_path, monkeypatch, capsys):
    for folder in node_caches:      # what the module's earlier sweeps cached there
        shutil.rmtree(folder, ignore_errors=True)
    warmups = []

    def recorded(*args, **kwargs):      # the real warm-up; its result kept for the checks below
        warmups.append(cache_warmup.warm_node_caches(*args, **kwargs))
        return warmups[-1]

    monkeypatch.setattr(runner, "warm_node_caches", recorded)
    args = sweep_args(synthetic_dir, tmp_path, two_nodes, "--storage", str(tmp_path / "shared"), "--seeds", "2",
                      "--epochs", "1", "--set", "image_size=32", "--set", "batch_size=16")
    assert main(Ablation, args) == 0
    printed = capsys.readouterr().out
    [nodes] = warmups
    assert sorted(node.cache_dir for node in nodes) == sorted(map(str, node_caches))
    assert len({node.node_id for node in nodes}) == 2
    for node in nodes:
        assert node.built == ["train 32 px", "val 32 px"] and node.found == []
        assert f"image cache on node {node.address} ({node.node_id[:8]}): built train 32 px, val 32 px" in printed
        # after both trials ran: the same builds (a rebuild writes a new build_id), and nothing else was cached
        for name, build_id in node.build_ids.items():
            key, size = name.rsplit("-", 1)
            assert read_manifest(node.cache_dir, key, int(size))["build_id"] == build_id != ""
        assert len(list(Path(node.cache_dir).glob("*.json"))) == 2
    # both trials ran and reported, one per node (each node has one CPU)
    results = [json.loads(line) for path in (tmp_path / "shared" / "mn").glob("baseline-s*/result.json")
               for line in path.read_text().splitlines() if line.strip()]
    assert sorted(r["epoch"] for r in results) == [1, 1]


def test_a_truncated_png_stops_the_sweep_in_the_warmup_naming_file_and_node(two_nodes, tmp_path, capsys):
    """Only decoding finds a truncated PNG: the driver's warm-up does, once, before any MLflow run or trial
    (before, every trial failed on it in turn, with retries)."""
    data = generate(tmp_path / "data", patients=20, image_size=32, seed=4)
    png = data / "images" / (data / "train_val_list.txt").read_text().split()[0]     # trials read train/val
    png.write_bytes(png.read_bytes()[:120])
    args = sweep_args(data, tmp_path, two_nodes, "--storage", str(tmp_path / "shared"), "--set", "image_size=32")
    assert main(Ablation, args) == 2
    error = capsys.readouterr().err
    assert f"error: {png}: corrupt or truncated PNG" in error and "(building the image cache on node " in error
    assert_no_sweep_logged(tmp_path)
    assert not ray.is_initialized()
