"""Reading a finished sweep's trials out of Tune's ResultGrid, and printing plain-text tables."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import pandas as pd
from ray.tune import ResultGrid
from ray.tune.experiment import Trial

from trainable.metric_names import VAL_AUC_MEAN

METRIC, MODE = VAL_AUC_MEAN, "max"     # what searches optimise and tables rank by


@dataclass(frozen=True)
class SweepReport:
    """What a finished sweep shows: printed text, parent-run tags, files saved beside sweep.json and logged."""
    text: str
    tags: dict[str, str]
    files: dict[str, str]          # file name -> content


@dataclass(frozen=True)
class TrialOutcome:
    config: dict[str, Any]
    metrics: dict[str, Any]        # the trial's last reported result
    failed: bool
    checkpoint: Any = None         # its last checkpoint (a tune.Checkpoint), if any

    @property
    def epoch(self) -> int:
        return int(self.metrics.get("epoch", 0))

    def ran_full_budget(self, epochs: int) -> bool:
        """Trained to the end: all `epochs`, or stopped by its own early_stop_patience (not by the scheduler)."""
        return self.epoch >= epochs or self.value("early_stopped") == 1.0

    def value(self, key: str) -> float:
        value = self.metrics.get(key)
        return float(value) if isinstance(value, (int, float)) else math.nan


def outcomes(results: ResultGrid) -> list[TrialOutcome]:
    return [TrialOutcome(config=dict(result.config or {}), metrics=dict(result.metrics or {}),
                         failed=result.error is not None, checkpoint=result.checkpoint) for result in results]


def unfinished_trials(saved: Iterable[Trial]) -> list[str]:
    """Names of the trials neither finished nor errored in the sweep's saved state: it was interrupted.

    `saved`: the trials read back from the storage (ExperimentAnalysis), because Tune's clean-up after an
    interruption reports every stopped trial as TERMINATED in the ResultGrid; the state it saved just before
    that has the real statuses.
    """
    return [str(trial) for trial in saved if trial.status not in (Trial.TERMINATED, Trial.ERROR)]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    mean = sum(finite) / len(finite)
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else math.nan
    return mean, sd


def fmt(value: float, digits: int = 3, signed: bool = False) -> str:
    if not math.isfinite(value):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def fmt_mean_sd(mean: float, sd: float) -> str:
    return fmt(mean) if not math.isfinite(sd) else f"{fmt(mean)} ± {fmt(sd)}"


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str) -> str:
    """Columns padded to width under a dashed rule (tabulate's "simple" format); `align` has one letter per column:
    l (text) or r (numbers). Cells are printed as given: no number parsing, so "+0.012" keeps its sign."""
    frame = pd.DataFrame([list(map(str, row)) for row in rows], columns=list(header))
    text = frame.to_markdown(index=False, tablefmt="simple", disable_numparse=True,
                             colalign=["left" if a == "l" else "right" for a in align])
    return "\n".join(line.rstrip() for line in text.splitlines())
