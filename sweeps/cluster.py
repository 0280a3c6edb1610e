"""Ray for a sweep: join the cluster (or start a local one) and refuse setups that could only hang or lose data."""
from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from trainable.backends import CUBLAS_WORKSPACE_ENV, DETERMINISTIC_CUBLAS_WORKSPACE
from trainable.errors import ConfigError

from .record import is_uri

PROBE_TIMEOUT_S = 60
CONNECT_TIMEOUT_S = 3
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_FIX = ("export RAY_AUTH_MODE=token and the cluster's token as RAY_AUTH_TOKEN (or in ~/.ray/auth_token, or a "
             "file named by RAY_AUTH_TOKEN_PATH); `ray get-auth-token` on the head node prints it")


def start_ray(address: str | None) -> None:
    """Join `address` (or RAY_ADDRESS); with neither, start a local Ray on this machine."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    # Warnings only, in the driver and in trials: Tune's progress table is the live view.
    quiet = {"logging_level": logging.WARNING, "logging_config": ray.LoggingConfig(log_level="WARNING")}
    # OpenMP threads that spin while waiting collapse CPU throughput when trials share a node's cores
    # (BENCHMARKS.md); passive waiting costs nothing when a trial has its cores to itself.
    # A fixed cuBLAS workspace must be set before a process's first cuBLAS call: deterministic=true needs it, and
    # a Ray actor reused across trials may have made that call in an earlier trial (trainable/backends.py).
    runtime_env = {"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                                CUBLAS_WORKSPACE_ENV: os.environ.get(CUBLAS_WORKSPACE_ENV,
                                                                     DETERMINISTIC_CUBLAS_WORKSPACE)}}
    if address:
        check_cluster_answers(address)
        try:
            ray.init(address=address, runtime_env=runtime_env, **quiet)
        except ray.exceptions.AuthenticationError:
            raise ConfigError(f"--address {address}: this Ray cluster needs token authentication and no token "
                              f"was found; {TOKEN_FIX}") from None
        except ConnectionError as err:
            raise ConfigError(f"--address {address}: cannot join this Ray cluster ({' '.join(str(err).split())})"
                              ) from None
    else:
        # 'local': never join a cluster a `ray start` left recorded on this machine. A new local Ray turns on
        # token authentication and warns that it did: nothing for the user to do, so that one warning is dropped.
        logging.getLogger(TOKEN_AUTH_LOGGER).setLevel(logging.ERROR)
        ray.init(address="local", include_dashboard=False, runtime_env=runtime_env, **quiet)


def check_cluster_answers(address: str) -> None:
    """Refuse in seconds what ray.init would retry for ~20 s and then report as a traceback: no cluster at the
    address, or one that wants a token this process does not send.

    The token probe asks the GCS for a key with a made-up cluster id: the GCS checks the token first and answers
    at once, InvalidAuthToken when it is missing or wrong (anything else means authentication passed).
    """
    if address.startswith("ray://"):
        return                                                   # Ray Client: its own handshake
    from ray._private.services import canonicalize_bootstrap_address
    from ray._raylet import GcsClient
    try:
        bootstrap = canonicalize_bootstrap_address(address)
    except (ValueError, ConnectionError) as err:
        raise ConfigError(f"--address {address}: {' '.join(str(err).split())}") from None
    if bootstrap is None:
        return
    host, _, port = bootstrap.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ConfigError(f"--address {address}: no Ray cluster answers at {bootstrap} ({err.strerror or err}); "
                          f"start one with `ray start --head` or fix the address") from None
    try:
        GcsClient(address=bootstrap, cluster_id="01" * 28).internal_kv_get(b"cxr-ablate-probe", None,
                                                                           timeout=CONNECT_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - only the token verdict matters here; ray.init reports the rest
        if "InvalidAuthToken" in str(err):
            raise ConfigError(f"--address {address}: this Ray cluster needs token authentication and the token "
                              f"is missing or wrong; {TOKEN_FIX}") from None


def alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node.get("Alive")]


def check_resources(cpus_per_trial: float, gpus_per_trial: float) -> None:
    """A trial asking for more than any single node has would stay PENDING forever: refuse it now."""
    nodes = alive_nodes()
    for name, flag, wanted in (("CPU", "--cpus-per-trial", cpus_per_trial), ("GPU", "--gpus-per-trial", gpus_per_trial)):
        largest = max((node["Resources"].get(name, 0.0) for node in nodes), default=0.0)
        if wanted > largest:
            raise ConfigError(f"{flag} {wanted:g}: no node of this Ray cluster has that many {name}s "
                              f"(largest node: {largest:g} across {len(nodes)} node(s))")
        if name == "GPU" and wanted == 0 and largest > 0:
            print(f"warning: the cluster has GPUs but --gpus-per-trial is 0: trials train on CPUs "
                  f"(e.g. --gpus-per-trial 1, or 0.5 to share a GPU between two small trials)", flush=True)


def check_shared_storage(storage: str, storage_given: bool) -> None:
    """With trials on several nodes, checkpoints must land where the driver (and resumed trials) can read them."""
    nodes = alive_nodes()
    if len(nodes) <= 1 or is_uri(storage):
        return
    if not storage_given:
        raise ConfigError(
            f"this Ray cluster has {len(nodes)} nodes but no --storage was given: trial checkpoints would stay on "
            f"the node that wrote them, where the driver cannot log them to MLflow and retries cannot resume "
            f"them. Pass --storage /shared/path (a folder mounted at the same path on every node, e.g. NFS) "
            f"or --storage s3://bucket/prefix")
    unseen = _nodes_not_seeing(Path(storage), nodes)
    if unseen:
        raise ConfigError(f"--storage {storage}: not shared; node(s) {', '.join(unseen)} do not see it. Use a "
                          f"folder mounted at the same path on every node (e.g. NFS) or an s3:// URI")


def _nodes_not_seeing(folder: Path, nodes: list[dict]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".shared-probe-{uuid.uuid4().hex}"
    marker.write_text("probe\n")

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        return os.path.exists(path)

    try:
        checks = {node["NodeManagerAddress"]: sees.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(str(marker))
                  for node in nodes}
        return [address for address, seen in zip(checks, ray.get(list(checks.values()), timeout=PROBE_TIMEOUT_S))
                if not seen]
    finally:
        marker.unlink(missing_ok=True)


def check_weight_files(configs) -> None:
    """Check each distinct (backbone, pretrained) of a sweep once, on the driver, before Ray starts: weights that
    cannot be had (no hub on an air-gapped machine, a missing or unfit file) would otherwise fail every trial
    that uses them, each after its retries. Fails in seconds with the fix (trainable.backbones.check_pretrained)."""
    from trainable.backbones import check_pretrained, warnings_for
    seen = set()
    for cfg in configs:
        if (cfg.backbone, cfg.pretrained) not in seen:
            seen.add((cfg.backbone, cfg.pretrained))
            check_pretrained(cfg)
            for warning in warnings_for(cfg):
                print(warning, flush=True)
