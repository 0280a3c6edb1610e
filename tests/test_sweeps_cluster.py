"""On a real two-node Ray cluster (two raylets on this machine): the checks that run once Ray is up refuse a sweep
without shared storage, and one asking more GPUs per trial than any node has; the driver builds each node's
image cache once, before the trials, which then only map it."""
import json
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
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "env_vars": {"CXR_CACHE_DIR": str(node_caches[0])}})
    cluster.add_node(num_cpus=1, env_vars={"CXR_CACHE_DIR": str(node_caches[1])})
    yield cluster.address
    cluster.shutdown()


def sweep_args(synthetic_dir, out, address, *extra):
    return ["--data", str(synthetic_dir), "--out", str(out), "--name", "mn", "--arms", "baseline", "--seeds", "1",
            "--address", address, "--set", "backbone=test_resnet", "--set", "pretrained=none", *extra]


def test_multi_node_sweep_without_storage_is_refused_with_the_fix(two_nodes, synthetic_dir, tmp_path, capsys):
    assert main(Ablation, sweep_args(synthetic_dir, tmp_path, two_nodes)) == 2
    error = capsys.readouterr().err
    assert "this Ray cluster has 2 nodes but no --storage was given" in error
    assert "--storage /shared/path" in error and "s3://" in error
    assert not ray.is_initialized()
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("mn") is None


def test_shared_storage_passes_and_more_gpus_than_any_node_has_is_refused(two_nodes, synthetic_dir, tmp_path,
                                                                         capsys):
    # Both raylets share this machine's disk, so the storage probe passes; the GPU check after it stops the sweep.
    args = sweep_args(synthetic_dir, tmp_path, two_nodes, "--storage", str(tmp_path / "shared"), "--gpus-per-trial", "2")
    assert main(Ablation, args) == 2
    error = capsys.readouterr().err
    assert "--gpus-per-trial 2: no node of this Ray cluster has that many GPUs (largest node: 0" in error
    assert not ray.is_initialized()
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("mn") is None


def test_the_driver_builds_each_nodes_cache_once_and_no_trial_rebuilds_it(two_nodes, node_caches, synthetic_dir,
                                                                          tmp_path, monkeypatch, capsys):
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
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("mn") is None
    assert not ray.is_initialized()
