"""How a trial is described: its name (`<arm>-s<seed>` in an ablation, `trial-NNNNN` in a search), its flat
TrialConfig resolved from Tune's config, and the MLflow tags of its child run.

Shared by Tune (trial names in the progress table) and the MLflow logger (child run names, params, tags), so
both show the same names. Everything here is pickled into Tune's experiment state, hence plain data.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from trainable.config import TrialConfig
from trainable.tune import ARM_KEY, TrialContext, resolve_config

if TYPE_CHECKING:
    from ray.tune.experiment import Trial


def trial_run_name(config: Mapping[str, Any], trial_id: str) -> str:
    if ARM_KEY in config:
        return f"{config[ARM_KEY]}-s{config.get('seed', 0)}"
    return f"trial-{trial_id.rsplit('_', 1)[-1]}"


def tune_trial_name(trial: "Trial") -> str:
    """Tune's trial_name_creator."""
    return trial_run_name(trial.config, trial.trial_id)


def tune_trial_dirname(trial: "Trial") -> str:
    """Tune's trial_dirname_creator: the readable name plus the unique id."""
    return f"{tune_trial_name(trial)}_{trial.trial_id}"


@dataclass(frozen=True)
class TrialDescriber:
    """Resolves a Tune trial's config into the flat TrialConfig and the MLflow tags of its child run."""
    kind: str
    context: TrialContext
    factors: Mapping[str, str] = field(default_factory=dict)     # arm -> factor it ablates

    @classmethod
    def for_sweep(cls, kind: str, context: TrialContext, factors: Mapping[str, str] | None = None
                  ) -> "TrialDescriber":
        # Only configs are resolved here: the data frame stays out of Tune's pickled experiment state.
        return cls(kind=kind, context=dataclasses.replace(context, data=None), factors=dict(factors or {}))

    def config(self, trial_config: Mapping[str, Any]) -> TrialConfig:
        return resolve_config(trial_config, self.context)

    def tags(self, trial_config: Mapping[str, Any], trial_id: str) -> dict[str, str]:
        tags = {"kind": self.kind, "trial_id": trial_id, "seed": str(self.config(trial_config).seed)}
        arm = trial_config.get(ARM_KEY)
        if arm is not None:
            tags.update(arm=str(arm), factor=self.factors.get(arm, arm))
        return tags
