"""deploy/: the Ray cluster-launcher YAML, the KubeRay RayCluster and the MLflow server recipe parse, and say what
the cluster needs: a head without GPUs, workers that request GPUs, the data folder and the Tune storage mounted on
every node at the paths the README's commands use, the image cache on local disk, and no secret in any file."""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DATA, STORAGE, CACHE = "/data", "/shared/runs", "/cache"


def load(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc is not None]


# --- Ray cluster launcher ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def launcher() -> dict:
    (config,) = load("ray-cluster.yaml")
    return config


def _docker_mounts(options: list[str]) -> dict[str, str]:
    """container path -> host path of `-v HOST:CONTAINER[:ro]` run options."""
    mounts = {}
    for option in options:
        words = shlex.split(option)
        if words[0] == "-v":
            host, container, *_ = words[1].split(":")
            mounts[container] = host
    return mounts


def test_launcher_head_has_no_gpus_and_the_workers_do(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"]["GPU"] == 0
    assert any("--head" in c and "--num-gpus=0" in c for c in launcher["head_start_ray_commands"])
    workers = [t for name, t in types.items() if name != launcher["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] >= 1 and t["max_workers"] > 0 for t in workers)
    assert launcher["max_workers"] >= max(t["max_workers"] for t in workers)
    assert launcher["provider"]["type"] and launcher["docker"]["image"].startswith("rayproject/ray:2.60.")


def test_launcher_mounts_data_and_storage_from_the_shared_file_system_and_the_cache_on_local_disk(launcher):
    mounts = _docker_mounts(launcher["docker"]["run_options"])      # docker options apply to every node
    nfs = [c for c in launcher["initialization_commands"] if "mount -t nfs" in c]
    assert len(nfs) == 1
    shared_root = nfs[0].split()[-1]                                 # where the NFS export is mounted on the host
    data = next(container for container in mounts if container.startswith(DATA))
    assert mounts[data].startswith(shared_root + "/") and mounts[STORAGE].startswith(shared_root + "/")
    assert any(f"{data}:ro" in option for option in launcher["docker"]["run_options"])
    assert not mounts[CACHE].startswith(shared_root)                 # local disk, not the shared file system
    assert f"CXR_CACHE_DIR={CACHE}" in " ".join(launcher["docker"]["run_options"])
    assert "." in launcher["file_mounts"].values() and any("pip install" in c for c in launcher["setup_commands"])


# --- KubeRay ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kuberay() -> tuple[dict, dict[str, dict]]:
    docs = load("kuberay-raycluster.yaml")
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    return cluster, claims


def _pods(cluster: dict) -> dict[str, dict]:
    spec = cluster["spec"]
    return {"head": spec["headGroupSpec"]["template"]["spec"],
            **{group["groupName"]: group["template"]["spec"] for group in spec["workerGroupSpecs"]}}


def test_kuberay_head_has_no_gpus_and_every_worker_group_requests_them(kuberay):
    cluster, _ = kuberay
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["spec"]["rayVersion"].startswith("2.60")
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    for container in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in {**container["resources"].get("requests", {}),
                                        **container["resources"].get("limits", {})}
    groups = cluster["spec"]["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["maxReplicas"] >= max(group["replicas"], 1)
        for container in group["template"]["spec"]["containers"]:
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_kuberay_every_pod_mounts_data_storage_and_a_node_local_cache(kuberay):
    cluster, claims = kuberay
    for pod_name, pod in _pods(cluster).items():
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            for path, access in ((DATA, {"ReadOnlyMany", "ReadWriteMany"}), (STORAGE, {"ReadWriteMany"})):
                claim = volumes[mounts[path]["name"]]["persistentVolumeClaim"]["claimName"]
                assert set(claims[claim]["spec"]["accessModes"]) & access, (pod_name, path)
            assert mounts[DATA].get("readOnly") is True
            assert "hostPath" in volumes[mounts[CACHE]["name"]], pod_name        # the node's own disk
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["CXR_CACHE_DIR"] == CACHE and env["MLFLOW_TRACKING_URI"].startswith("http")


# --- MLflow server ------------------------------------------------------------------------------------------------

def test_mlflow_compose_backs_the_server_with_postgres_and_an_artifact_store():
    (compose,) = load("mlflow/docker-compose.yaml")
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    server = services["mlflow"]
    assert "postgres" in server["depends_on"]
    env = server["environment"]
    assert re.fullmatch(r"postgresql://mlflow:\$\{POSTGRES_PASSWORD\}@postgres:5432/mlflow",
                        env["MLFLOW_BACKEND_STORE_URI"])
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://") and "minio" in services
    dockerfile = (DEPLOY / "mlflow" / "Dockerfile").read_text()
    assert "psycopg[binary]" in dockerfile and "serve.sh" in dockerfile
    serve = DEPLOY / "mlflow" / "serve.sh"
    assert os.access(serve, os.X_OK) and "--backend-store-uri" in serve.read_text()


def _values_of_secret_keys(node, key: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _values_of_secret_keys(v, str(k))
    elif isinstance(node, list):
        for item in node:
            yield from _values_of_secret_keys(item, key)
    elif re.search(r"(?i)password|secret|token", key):
        yield key, node


def test_no_deploy_file_holds_a_secret():
    """Passwords come from the environment (.env, git-ignored): the value of every password-like key is a
    ${VARIABLE} reference, and no URI carries a literal password."""
    for path in DEPLOY.rglob("*.yaml"):
        for doc in load(str(path.relative_to(DEPLOY))):
            for key, value in _values_of_secret_keys(doc):
                assert re.fullmatch(r"\$\{\w+(:?[-?][^}]*)?\}", str(value)), (path.name, key)
        assert not re.search(r"://[^:/@\s]+:(?!\$\{)[^@/\s]+@", path.read_text()), path
    assert "deploy/mlflow/.env" in (DEPLOY.parent / ".gitignore").read_text().split()
