"""`--list`: the ablation arms (what each changes relative to the baseline) and the Optuna space, as text."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from search_spaces import BASELINE_ARM, OPTUNA_SPACE_FILE, SearchParam, load_arms, load_optuna_space

from .report import format_table


def _relative(path: str | Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe_arms(arms_file: str | Path | None = None) -> str:
    arms = load_arms(extra=arms_file)
    baseline = arms[BASELINE_ARM].config({}).to_dict()
    rows = []
    for arm in arms.values():
        config = arm.config(baseline).to_dict()
        changes = {k: v for k, v in config.items() if v != baseline[k]}
        shown = " ".join(f"{k}={_show(v)}" for k, v in changes.items()) or "(the CheXNet replica)"
        rows.append([arm.name, arm.factor, shown])
    sources = ", ".join(_relative(s) for s in dict.fromkeys(arm.source for arm in arms.values()))
    return f"ablation arms ({sources}); changes are relative to the baseline:\n" + \
        format_table(["arm", "factor", "changes"], rows, "lll")


def _domain(param: SearchParam) -> str:
    if param.choices is not None:
        return ", ".join(map(_show, param.choices))
    scale = " (log)" if param.log else ""
    step = f" step {_show(param.step)}" if param.step else ""
    return f"{_show(param.low)} .. {_show(param.high)}{scale}{step}"


def describe_space(space_file: str | Path = OPTUNA_SPACE_FILE) -> str:
    space = load_optuna_space(space_file)
    rows = [[p.name, p.kind, _domain(p), " and ".join(f"{k} in {'/'.join(map(_show, v))}" for k, v in p.when.items())]
            for p in space.params]
    return f"Optuna space ({_relative(space.source)}), from preset {space.base_preset!r}:\n" + \
        format_table(["param", "kind", "domain", "only when"], rows, "llll")


def describe(arms_file: str | Path | None = None, space_file: str | Path = OPTUNA_SPACE_FILE) -> str:
    return describe_arms(arms_file) + "\n\n" + describe_space(space_file)

