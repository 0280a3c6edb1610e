"""On a real two-node Ray cluster (two raylets on this machine): the checks that run once Ray is up refuse a sweep
without shared storage, and one asking more GPUs per trial than any node has."""
import pytest
import ray
from mlflow import MlflowClient
from ray.cluster_utils import Cluster

from sweeps.ablation import Ablation
from sweeps.runner import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
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
