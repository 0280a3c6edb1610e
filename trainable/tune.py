"""The Ray Tune adapter: runs trainable.train inside a Tune function trainable.

Reports and checkpoints go through `ray.tune.report(..., checkpoint=tune.Checkpoint...)` and resume comes from
`tune.get_checkpoint()` (`ray.train.report` fails a Tune trial in Ray 2.60). Trials never talk to MLflow: the
driver logs what they report (see sweeps/), so the embedded SQLite store has a single writer and trials on other
nodes need no route to the tracking store.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ray import tune

from .config import FIELD_TYPES, TrialConfig
from .data.nih import PreparedData
from .train import train

ARM_KEY = "arm"


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares; passed once through Ray's object store by `tune.with_parameters`."""
    data: PreparedData
    base_config: Mapping[str, Any]
    arms: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    cache_dir: str | None = None


def resolve_config(trial_config: Mapping[str, Any], context: TrialContext) -> TrialConfig:
    """The flat TrialConfig of one trial: sweep base, then its arm's overrides, then the trial's own keys."""
    arm = trial_config.get(ARM_KEY)
    own = {k: v for k, v in trial_config.items() if k in FIELD_TYPES}
    arm_overrides = context.arms[arm] if arm is not None else {}
    return TrialConfig.from_dict({**context.base_config, **arm_overrides, **own})


def run_trial(config: dict, context: TrialContext) -> None:
    """Ray Tune function trainable: `tune.with_parameters(run_trial, context=...)`."""
    cfg = resolve_config(config, context)

    def report(metrics: dict, checkpoint_dir: Path) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        train(cfg, context.data, report, cache_dir=context.cache_dir)
        return
    with checkpoint.as_directory() as resume_dir:
        train(cfg, context.data, report, cache_dir=context.cache_dir, resume_from=resume_dir)
