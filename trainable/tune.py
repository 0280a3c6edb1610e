"""The Ray Tune adapter: runs trainable.train inside a Tune function trainable.

Reports and checkpoints go through `ray.tune.report(..., checkpoint=tune.Checkpoint...)` and resume comes from
`tune.get_checkpoint()` (`ray.train.report` fails a Tune trial in Ray 2.60). Trials never talk to MLflow: the
driver logs what they report (see sweeps/), so the embedded SQLite store has a single writer and trials on other
nodes need no route to the tracking store. Every report carries `WHERE_KEY`: the device, node and versions.

Retries. Tune retries every trial error up to FailureConfig.max_failures and has no per-error policy. A
deterministic failure (errors.DETERMINISTIC_FAILURES: bad config value, corrupt image, NaN loss) would fail the
same way each time, so before raising it the trial tells the driver through the sweep's `FailureRegistry`
actor and waits until the driver has set this trial's `max_failures` to 0 (sweeps.failures.NoRetryForDeterministic):
Tune then ends it ERROR at once. A killed worker raises nothing here and keeps Tune's retries.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import ray
from ray import tune

from .config import FIELD_TYPES, TrialConfig
from .data.nih import PreparedData
from .errors import DETERMINISTIC_FAILURES
from .runtime import gpu_device, pick_device, where_it_runs
from .train import train

ARM_KEY = "arm"
WHERE_KEY = "ran_on"              # result key: where_it_runs() of the reporting process
ACK_TIMEOUT_S = 60                # how long a failing trial waits for the driver before raising anyway


@ray.remote(num_cpus=0)
class FailureRegistry:
    """Deterministic failures trials announce (trial id -> one-line reason) and the driver acknowledges."""

    def __init__(self) -> None:
        self.pending: dict[str, str] = {}
        self.acknowledged: set[str] = set()

    def announce(self, trial_id: str, reason: str) -> None:
        self.pending[trial_id] = reason

    def take(self) -> dict[str, str]:
        pending, self.pending = self.pending, {}
        return pending

    def acknowledge(self, trial_ids: list[str]) -> None:
        self.acknowledged.update(trial_ids)

    def is_acknowledged(self, trial_id: str) -> bool:
        return trial_id in self.acknowledged


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares; passed once through Ray's object store by `tune.with_parameters`."""
    data: PreparedData
    base_config: Mapping[str, Any]
    arms: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    cache_dir: str | None = None
    failure_registry: str | None = None     # name of the sweep's FailureRegistry actor


def resolve_config(trial_config: Mapping[str, Any], context: TrialContext) -> TrialConfig:
    """The flat TrialConfig of one trial: sweep base, then its arm's overrides, then the trial's own keys."""
    arm = trial_config.get(ARM_KEY)
    own = {k: v for k, v in trial_config.items() if k in FIELD_TYPES}
    arm_overrides = context.arms[arm] if arm is not None else {}
    return TrialConfig.from_dict({**context.base_config, **arm_overrides, **own})


def node_name() -> str:
    return f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"


def run_trial(config: dict, context: TrialContext) -> None:
    """Ray Tune function trainable: `tune.with_parameters(run_trial, context=...)`."""
    try:
        _run(config, context)
    except DETERMINISTIC_FAILURES as err:
        _announce_no_retry(context, err)
        raise


def _run(config: dict, context: TrialContext) -> None:
    cfg = resolve_config(config, context)
    gpus = tune.get_context().get_trial_resources().required_resources.get("GPU", 0)
    device = gpu_device(gpus, node_name()) if gpus > 0 else pick_device()
    where = where_it_runs(device, node_name())

    def report(metrics: dict, checkpoint_dir: Path) -> None:
        tune.report({**metrics, WHERE_KEY: where}, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        train(cfg, context.data, report, cache_dir=context.cache_dir, device=device)
        return
    with checkpoint.as_directory() as resume_dir:
        train(cfg, context.data, report, cache_dir=context.cache_dir, resume_from=resume_dir, device=device)


def _announce_no_retry(context: TrialContext, err: BaseException) -> None:
    """Tell the driver this failure is deterministic and wait until it has switched off this trial's retries."""
    if context.failure_registry is None:
        return
    trial_id = tune.get_context().get_trial_id()
    try:
        registry = ray.get_actor(context.failure_registry)
        ray.get(registry.announce.remote(trial_id, f"{type(err).__name__}: {err}"))
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while time.monotonic() < deadline and not ray.get(registry.is_acknowledged.remote(trial_id)):
            time.sleep(0.05)
    except (ValueError, ray.exceptions.RayError):
        pass   # no driver to tell (it died): Tune's ordinary retries apply
