"""Search sweeps: which factors matter (optuna.importance) and which way they push, from full-budget trials only.

Importance comes from an Optuna study rebuilt from the finished trials' params and final metrics, scored with
Optuna's default evaluator (PED-ANOVA), which handles conditional factors (focal_gamma exists only when
loss=focal); fANOVA does not. Its target quantile holds at least 5 trials (Optuna's advice). With tens of trials
PED-ANOVA gives conditional factors, each seen in a few trials, large importances from noise alone (measured:
momentum and oversample_power ranked above lr with 47 trials whose outcome ignored them), so each importance for
the mean AUC is set against a noise floor: the 95th percentile of that factor's importance over 40 studies with
the outcomes shuffled between trials. Importance says *how much* a factor matters, not in which direction, so
the report puts grouped outcomes beside it: the mean final val AUC per category, or per tertile of a continuous
factor.

Caveats the report states: only trials that ran the full budget are comparable (a pruned trial's AUC is an
early-epoch number), and those are survivors of ASHA, which keeps what *converges fast*; fast is not better at
the end. Single-seed, single-split numbers cannot support a claim: the top configurations must be re-run at
full budget with several seeds as an ablation (the report writes the arms file and prints the command).
"""
from __future__ import annotations

import ast
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import optuna
import pandas as pd
import yaml

from search_spaces import BASELINE_ARM, OPTUNA_SPACE_FILE, SearchParam, SearchSpace, load_arms, load_optuna_space
from trainable.config import TrialConfig, coerce
from trainable.data.nih import write_text_atomically
from trainable.errors import UserError
from trainable.findings import FINDINGS
from trainable.metric_names import VAL_AUC_MEAN

from .commands import data_option_words, python_words, shell_join
from .effects import MEAN
from .sweep_reader import SweepResults, TrialRun, parent_param

OBJECTIVE = VAL_AUC_MEAN
MIN_TRIALS = 3            # fewer finished trials than this cannot rank anything
FEW_TRIALS = 50           # below this, importance rankings move with a handful of trials
SHUFFLES = 40             # shuffled-outcome studies behind the importance noise floor
TOP_QUANTILE_TRIALS = 5   # trials PED-ANOVA should see in its top quantile
TOP_CONFIGS = 3
RERUN_SEEDS = 3
# sweep options carried over to the re-run command when the search set them
CARRIED_OPTIONS = ("address", "storage", "mlflow_uri", "gpus_per_trial", "cpus_per_trial", "max_concurrent")


def fixed_keys(sweep: SweepResults) -> list[str]:
    """Config keys the search fixed with --set (the parent run's `set` param is the printed list)."""
    return [item.split("=", 1)[0] for item in _set_items(sweep)]


def _set_items(sweep: SweepResults) -> list[str]:
    raw = parent_param(sweep, "set", "[]")
    try:
        items = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        items = []
    return [str(item) for item in items] if isinstance(items, list) else []


def searched_space(sweep: SweepResults) -> SearchSpace:
    """The search's space as the sweep ran it: its --space-file (relative to the repo root) minus --set keys."""
    space_file = Path(parent_param(sweep, "space_file", str(OPTUNA_SPACE_FILE)))
    if not space_file.is_file():
        raise UserError(f"search sweep {sweep.name}: its space file {space_file} is not here; run the report "
                        f"from the repository root the search ran from")
    return load_optuna_space(space_file).without(fixed_keys(sweep))


def _distribution(param: SearchParam) -> optuna.distributions.BaseDistribution:
    if param.kind == "categorical":
        return optuna.distributions.CategoricalDistribution(list(param.choices))
    if param.kind == "int":
        return optuna.distributions.IntDistribution(int(param.low), int(param.high), log=param.log,
                                                    step=int(param.step or 1))
    return optuna.distributions.FloatDistribution(param.low, param.high, log=param.log, step=param.step)


def active_params(trial: TrialRun, space: SearchSpace) -> dict[str, Any]:
    """The params the search suggested for this trial (conditional ones only where their condition held)."""
    chosen: dict[str, Any] = {}
    for param in space.params:
        if param.applies(chosen) and param.name in trial.params:
            chosen[param.name] = coerce(param.name, trial.params[param.name], source=f"trial {trial.name}")
    return chosen


def full_budget_trials(sweep: SweepResults) -> list[TrialRun]:
    return [t for t in sweep.trials if t.full_budget and np.isfinite(t.metrics.get(OBJECTIVE, np.nan))]


def build_study(trials: Sequence[TrialRun], space: SearchSpace,
                findings: Sequence[str] = FINDINGS) -> optuna.Study:
    """An Optuna study holding the finished trials: value = final val_auc_mean, user attrs = per-finding AUC."""
    distributions = {param.name: _distribution(param) for param in space.params}
    optuna.logging.set_verbosity(optuna.logging.WARNING)     # no "new study created" line in the report
    study = optuna.create_study(direction="maximize")
    for trial in trials:
        params = active_params(trial, space)
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={name: distributions[name] for name in params},
            value=float(trial.metrics[OBJECTIVE]),
            user_attrs={finding: float(trial.metrics.get(f"val_auc_{finding}", np.nan)) for finding in findings}))
    return study


def top_quantile(n_trials: int) -> float:
    """PED-ANOVA's target quantile: at least 5 trials in it, as Optuna's docs ask for to stabilise it."""
    return min(0.5, max(0.1, TOP_QUANTILE_TRIALS / max(n_trials, 1)))


def _importances(study: optuna.Study, target: Any) -> dict[str, float]:
    """Raw (unnormalised) PED-ANOVA importances; PED-ANOVA ranks by "lower is better", so AUC targets are negated."""
    evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=top_quantile(len(study.trials)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # PED-ANOVA warns about few trials; the report says so itself
        return optuna.importance.get_param_importances(study, evaluator=evaluator, target=target, normalize=False)


def _shuffled(study: optuna.Study, values: np.ndarray) -> optuna.Study:
    shuffled = optuna.create_study(direction="maximize")
    shuffled.add_trials([optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=float(v))
                         for t, v in zip(study.trials, values)])
    return shuffled


def noise_floor(study: optuna.Study, shuffles: int = SHUFFLES, seed: int = 0) -> dict[str, float]:
    """Per param, the 95th percentile of its raw importance for the mean AUC when the outcomes are shuffled
    over trials: what importance a factor gets from nothing, given this many trials and this space (conditional
    factors, seen in few trials, get a lot)."""
    rng = np.random.default_rng(seed)
    values = np.array([t.value for t in study.trials])
    draws = [_importances(_shuffled(study, rng.permutation(values)), lambda t: -t.value) for _ in range(shuffles)]
    params = {name for draw in draws for name in draw}
    return {name: float(np.percentile([draw.get(name, 0.0) for draw in draws], 95)) for name in params}


def factor_importance(study: optuna.Study, findings: Sequence[str] = FINDINGS, *, shuffles: int = SHUFFLES
                      ) -> tuple[pd.DataFrame, list[str]]:
    """Tidy (target, param, importance, raw_importance, noise_floor, above_noise) for the mean AUC and each
    finding; importance is normalised per target; the noise floor (mean AUC only) comes from shuffled outcomes."""
    rows, notes = [], []
    targets: list[tuple[str, Any]] = [(MEAN, lambda t: -t.value)]
    for finding in findings:
        values = [t.user_attrs.get(finding, np.nan) for t in study.trials]
        if np.isfinite(values).all():
            targets.append((finding, lambda t, f=finding: -t.user_attrs[f]))
        else:
            notes.append(f"{finding}: AUC undefined in some trials (no positives in validation); no importance")
    for name, target in targets:
        try:
            raw = _importances(study, target)
            floor = noise_floor(study, shuffles) if name == MEAN and shuffles else {}
        except (ValueError, RuntimeError) as err:
            notes.append(f"{name}: importance not computable ({err})")
            continue
        total = sum(raw.values()) or 1.0
        for param, value in raw.items():
            limit = floor.get(param, np.nan)
            rows.append((name, param, value / total, value, limit, value > limit if floor else pd.NA))
    columns = ["target", "param", "importance", "raw_importance", "noise_floor", "above_noise"]
    return pd.DataFrame(rows, columns=columns), notes


def factor_directions(trials: Sequence[TrialRun], space: SearchSpace) -> pd.DataFrame:
    """Mean final val AUC per category (or tertile, for continuous factors) of each searched factor; trials where
    a conditional factor was not suggested form the group "(not used)"."""
    outcome = pd.Series([float(t.metrics[OBJECTIVE]) for t in trials])
    rows = []
    for param in space.params:
        values = pd.Series([active_params(t, space).get(param.name) for t in trials], dtype=object)
        used = values.notna()
        if param.kind == "categorical":
            groups = [(str(choice), values.map(str) == str(choice)) for choice in param.choices]
        else:
            numeric = pd.to_numeric(values[used])
            tertile = pd.qcut(numeric.rank(method="first"), q=min(3, len(numeric)), labels=False) if len(numeric) \
                else numeric
            groups = []
            for index, name in enumerate(("low", "mid", "high")[:int(tertile.max()) + 1] if len(numeric) else ()):
                members = numeric[tertile == index]
                mask = pd.Series(False, index=values.index)
                mask[members.index] = True
                groups.append((f"{name} {members.min():.3g} – {members.max():.3g}", mask))
        groups.append(("(not used)", ~used))
        for group, mask in groups:
            if mask.any():
                rows.append((param.name, group, int(mask.sum()), outcome[mask].mean(),
                             outcome[mask].mean() - outcome.mean(), outcome[mask].max()))
    return pd.DataFrame(rows, columns=["param", "group", "n_trials", "mean_val_auc", "vs_all_trials", "best_val_auc"])


def top_trials(trials: Iterable[TrialRun], count: int = TOP_CONFIGS) -> list[TrialRun]:
    return sorted(trials, key=lambda t: t.metrics[OBJECTIVE], reverse=True)[:count]


def rerun_arms(top: Sequence[TrialRun], fixed: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Ablation arms (search_spaces/arms.yaml format) for the top trials: each one's config keys that differ
    from the baseline arm, except seed and epochs (the re-run sets those) and --set keys (passed again)."""
    baseline = load_arms()[BASELINE_ARM].config({}).to_dict()
    skip = {"seed", "epochs", *fixed}
    arms = {}
    for rank, trial in enumerate(top, start=1):
        config = TrialConfig.from_dict({k: v for k, v in trial.params.items() if k in baseline},
                                       source=f"trial {trial.name}").to_dict()
        changes = {k: v for k, v in config.items() if v != baseline[k] and k not in skip}
        arms[f"search_top{rank}"] = {"factor": "search", **changes}
    return arms


def write_rerun_arms(arms: Mapping[str, Mapping[str, Any]], top: Sequence[TrialRun], path: Path) -> Path:
    header = "".join(f"# search_top{rank}: trial {t.name} (run {t.run_id}), final {OBJECTIVE} "
                     f"{t.metrics[OBJECTIVE]:.4f} at full budget, one seed\n" for rank, t in enumerate(top, start=1))
    write_text_atomically(path, "# Re-run these at full budget with several seeds before claiming anything.\n"
                          + header + yaml.safe_dump(dict(arms), sort_keys=False))
    return path


def rerun_command(sweep: SweepResults, arms_file: Path, arm_names: Sequence[str], seeds: int = RERUN_SEEDS) -> str:
    """The ablation that re-runs the top configurations against the baseline at the search's full budget, on the
    search's data split (its recorded data options), as a command that runs as pasted."""
    words = [*python_words("sweeps/run_ablation.py"), "--arms-file", arms_file, "--arms", ",".join(arm_names),
             "--seeds", seeds, "--epochs", parent_param(sweep, "epochs", TrialConfig().epochs),
             "--name", f"{sweep.experiment_name}-rerun"]
    data = parent_param(sweep, "data")
    words += ["--data", data] if data else ["--demo"]
    words += data_option_words(sweep.parent_params)
    for key in CARRIED_OPTIONS:
        if parent_param(sweep, key) not in (None, "0", "0.0", "False"):
            words += [f"--{key.replace('_', '-')}", parent_param(sweep, key)]
    for item in _set_items(sweep):
        words += [] if item.startswith("seed=") else ["--set", item]
    return shell_join(words)
