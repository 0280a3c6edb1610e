"""Where final training's configs come from: a config file (best_config.json), or a sweep's MLflow runs.

A sweep's configs are ranked by validation only: trials that differ only in their seed are one config, scored by
the mean of their final `val_auc_mean` over their full-budget (finished, not pruned) trials. Test metrics are
never consulted (sweeps do not log any).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from dashboards.commands import data_option_words
from dashboards.sweep_reader import SweepResults, TrialRun, open_sweep
from trainable.config import TrialConfig
from trainable.errors import ConfigError, UserError

from .members import SELECTION_METRIC


@dataclass(frozen=True)
class Candidate:
    label: str                  # the arm, the trial's run name, or the config file's stem
    config: TrialConfig
    val_auc_mean: float = math.nan
    trials: int = 0


def from_config_file(path: str | Path) -> Candidate:
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    except ValueError as err:
        raise UserError(f"--config {path}: not JSON ({err})") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a JSON object of config keys (a best_config.json)")
    return Candidate(label=path.stem.replace("_", "-"), config=TrialConfig.from_dict(values, source=str(path)))


def _config(trial: TrialRun) -> TrialConfig:
    try:
        return TrialConfig.from_dict(trial.params, source=f"run {trial.name} ({trial.run_id}) params")
    except ConfigError as err:
        raise UserError(f"{err} (was the sweep run with another version of the code?)") from None


def rank_configs(sweep: SweepResults) -> list[Candidate]:
    """The sweep's configs, best validation mean AUC first."""
    groups: dict[str, list[tuple[TrialRun, TrialConfig]]] = {}
    for trial in sweep.trials:
        if not trial.full_budget or SELECTION_METRIC not in trial.metrics:
            continue
        config = _config(trial)
        key = json.dumps({**config.to_dict(), "seed": None}, sort_keys=True)
        groups.setdefault(key, []).append((trial, config))
    if not groups:
        raise UserError(f"sweep {sweep.name!r} (parent run {sweep.parent_run_id}): no trial ran its full budget; "
                        f"nothing to choose from")
    candidates = []
    for members in groups.values():
        trials = sorted(members, key=lambda pair: pair[1].seed)
        first, config = trials[0]
        values = [t.metrics[SELECTION_METRIC] for t, _ in trials if math.isfinite(t.metrics[SELECTION_METRIC])]
        candidates.append(Candidate(label=first.arm or first.name, config=config, trials=len(trials),
                                    val_auc_mean=sum(values) / len(values) if values else -math.inf))
    return sorted(candidates, key=lambda c: (-c.val_auc_mean, c.label))


def sweep_candidates(client, sweep_ref: str, top: int) -> tuple[SweepResults, list[Candidate]]:
    sweep = open_sweep(client, sweep_ref)
    ranked = rank_configs(sweep)
    if top > len(ranked):
        raise UserError(f"--ensemble {top}: sweep {sweep.name!r} has only {len(ranked)} config(s) with finished "
                        f"trials")
    return sweep, ranked[:top]


def sweep_data_arguments(sweep: SweepResults) -> list[str]:
    """The sweep's recorded data options as command-line arguments (for trainable's data argument parser)."""
    params = sweep.parent_params
    if params.get("data") in (None, "", "None"):
        raise UserError(f"sweep {sweep.name!r} (parent run {sweep.parent_run_id}) records no data folder; "
                        f"pass --data")
    return ["--data", params["data"], *data_option_words(params)]
