"""Which trial failures are retried, and what a failed sweep's exit code says.

Tune retries every trial error up to --max-failures. Infrastructure failures (a worker killed, a node lost) are
what retries are for; a deterministic failure (a bad config value found in the trial, a corrupt image met while
decoding, a loss that became NaN) fails again each time, costing a retry per attempt and hiding its reason
behind repeats. Trials announce those through trainable.tune.FailureRegistry before raising; this callback, in
the driver's Tune loop, sets that trial's `max_failures` to 0 and acknowledges, so Tune's own
`Trial.should_recover` ends the trial ERROR on its first attempt (Ray Tune 2.60 has no per-error retry policy).
"""
from __future__ import annotations

import logging
import re
import time
from typing import Any

import ray
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from trainable.errors import ConfigError, UserError
from trainable.tune import FailureRegistry

POLL_EVERY_S = 0.1             # the driver's loop steps every <= 0.1 s; a failing trial waits about this long
POLL_TIMEOUT_S = 10
REGISTRY_START_TIMEOUT_S = 120
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")     # Ray colours the actor names in its error texts
logger = logging.getLogger(__name__)


def registry_name(sweep_name: str) -> str:
    return f"cxr-ablate-failures-{sweep_name}"


def start_registry(sweep_name: str):
    """The sweep's FailureRegistry actor, started and answering before Tune starts; keep the handle for as long
    as the sweep runs (the actor lives as long as this, its owner's, handle).

    An actor that cannot start is an error, not a warning: the sweep would otherwise run with deterministic
    failures retried again (the behaviour this module exists to end), and Tune's trials are actors too, so on a
    cluster that cannot start this one they would most likely fail as well, each after its retries.
    """
    name = registry_name(sweep_name)
    try:
        # on the driver's node: a lost worker node must not take the registry with it
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        registry = FailureRegistry.options(name=name, scheduling_strategy=here).remote()
        ray.get(registry.take.remote(), timeout=REGISTRY_START_TIMEOUT_S)
    except (ValueError, ray.exceptions.RayError) as err:
        # the last line says why (Ray's text above it is the actor's address and a traceback)
        lines = [line.strip() for line in ANSI_ESCAPE.sub("", str(err)).splitlines() if line.strip()]
        reason = lines[-1][:300] if lines else type(err).__name__
        raise ConfigError(f"this Ray cluster could not start the sweep's actor {name} ({type(err).__name__}: "
                          f"{reason}; waited up to {REGISTRY_START_TIMEOUT_S} s); trials are actors too and would "
                          f"fail the same way: check `ray status` and the Ray logs of the cluster's nodes") from None
    return registry


class NoRetryForDeterministic(Callback):
    def __init__(self, sweep_name: str, max_failures: int):
        self.name = registry_name(sweep_name)
        self.max_failures = max_failures
        self._registry = None
        self._polled = 0.0
        self._warned = False

    def __getstate__(self) -> dict:                 # pickled into Tune's experiment state: no actor handle
        return {**self.__dict__, "_registry": None}

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        trial.max_failures = self.max_failures      # a resumed trial zeroed in an earlier session gets them back

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if time.monotonic() - self._polled < POLL_EVERY_S:
            return
        self._polled = time.monotonic()
        try:
            self._registry = self._registry or ray.get_actor(self.name)
            announced = ray.get(self._registry.take.remote(), timeout=POLL_TIMEOUT_S)
            if not announced:
                return
            for trial in trials:
                if trial.trial_id in announced:
                    trial.max_failures = 0
            ray.get(self._registry.acknowledge.remote(list(announced)), timeout=POLL_TIMEOUT_S)
        except (ValueError, ray.exceptions.RayError) as err:
            # Never stop a running sweep over this: without the registry (lost with its node), failures get Tune's
            # ordinary retries. Said once, not at every poll.
            self._registry = None
            if not self._warned:
                self._warned = True
                logger.warning("no-retry registry %s unavailable (%s); deterministic failures will be retried",
                               self.name, " ".join(str(err).split())[:200])


def cause_of(error: BaseException | None) -> BaseException | None:
    """The trainable's own exception inside Tune's wrappers (a RayTaskError keeps it as .cause)."""
    for _ in range(5):
        inner = getattr(error, "cause", None)
        if not isinstance(inner, BaseException) or inner is error:
            break
        error = inner
    return error


def _user_error_names() -> set[str]:
    """Qualified names of UserError and its subclasses, as a traceback's last line writes them."""
    names, todo = set(), [UserError]
    while todo:
        cls = todo.pop()
        names.add(f"{cls.__module__}.{cls.__qualname__}")
        todo += cls.__subclasses__()
    return names


def bad_input_reason(error: BaseException | None) -> str | None:
    """The one-line reason of a trial failure the user fixes in the input (config, data, weights), else None.

    Tune gives the driver either the exception itself (inside a RayTaskError) or, since the logger keeps Tune
    from unpickling a trial's error.pkl (sweeps/mlflow_logger.py), a TuneError holding the text of its
    error.txt, whose last line names the exception's class.
    """
    cause = cause_of(error)
    if cause is None:
        return None
    if isinstance(cause, UserError):
        return " ".join(str(cause).split())
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    name, found, reason = (lines[-1] if lines else "").partition(": ")
    return reason if found and name in _user_error_names() else None


def is_bad_input(error: BaseException | None) -> bool:
    """A trial failure the user fixes in the input: the sweep then exits 2."""
    return bad_input_reason(error) is not None
