"""Search spaces as data: presets, ablation arms and the Optuna space live in YAML beside this file.

The loaders here validate every entry against TrialConfig and its registries, so a typo fails before Ray starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Iterable, Mapping

import yaml

from trainable.config import CHOICES, FIELD_TYPES, TrialConfig, coerce
from trainable.errors import ConfigError

HERE = Path(__file__).resolve().parent


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping: plain YAML keeps the last one without a word,
    so an arm defined twice would silently run only its second definition."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":     # `<<: *base` then overriding keys is fine
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue                                      # the base class reports unhashable keys
            if key in first_line:
                raise ConfigError(f"{self.name}: line {key_node.start_mark.line + 1}: {key!r} is defined twice in "
                                  f"one mapping (first at line {first_line[key]}); give each entry its own name")
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file, turning a syntax error or a duplicated key into a one-line ConfigError naming the file
    and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    loader = _UniqueKeyLoader(path.read_text())
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    finally:
        loader.dispose()


def load_presets(path: str | Path = HERE / "presets.yaml") -> dict[str, TrialConfig]:
    """Every preset validated as a full TrialConfig (defaults + the preset's overrides)."""
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of preset name -> overrides")
    return {name: TrialConfig.from_dict(values or {}, source=f"{path}: preset {name!r}")
            for name, values in raw.items()}


def load_preset(name: str) -> TrialConfig:
    """A named preset from presets.yaml (plain config overrides of the CheXNet defaults)."""
    presets = load_presets()
    if name not in presets:
        raise ConfigError(f"preset {name!r} is not one of: {', '.join(presets)}")
    return presets[name]


def build_config(values: Mapping[str, Any], source: str) -> TrialConfig:
    """TrialConfig.from_dict whose every error names `source` (its range and registry checks say 'config:')."""
    try:
        return TrialConfig.from_dict(values, source=source)
    except ConfigError as err:
        message = str(err)
        if message.startswith(source):
            raise
        raise ConfigError(f"{source}: {message.removeprefix('config: ')}") from None


# --- ablation arms ------------------------------------------------------------------------------------------

ARMS_FILE = HERE / "arms.yaml"
BASELINE_ARM = "baseline"
ARM_META_KEYS = ("preset", "factor")   # the only keys of an arm that are not TrialConfig keys


@dataclass(frozen=True)
class Arm:
    """One ablation arm: the config keys it sets on top of the baseline, and the factor it ablates."""
    name: str
    factor: str
    overrides: Mapping[str, Any]       # a preset arm holds the preset's full config here
    source: str                        # file the arm came from, for messages

    def config(self, baseline: Mapping[str, Any]) -> TrialConfig:
        return build_config({**baseline, **self.overrides}, source=f"{self.source}: arm {self.name!r}")


def load_arms(path: str | Path = ARMS_FILE, *, extra: str | Path | None = None) -> dict[str, Arm]:
    """The built-in arms plus those of `extra` (an --arms-file), each validated as a full TrialConfig."""
    presets = load_presets()
    arms = _read_arms(path, presets)
    if BASELINE_ARM not in arms:
        raise ConfigError(f"{path}: no {BASELINE_ARM!r} arm; every other arm is defined relative to it")
    if extra is not None:
        for name, arm in _read_arms(extra, presets).items():
            if name in arms:
                raise ConfigError(f"{extra}: arm {name!r} is already defined in {arms[name].source}; "
                                  f"give it another name")
            arms[name] = arm
    baseline = arms[BASELINE_ARM].config({}).to_dict()
    for arm in arms.values():
        arm.config(baseline)
    return arms


def _read_arms(path: str | Path, presets: Mapping[str, TrialConfig]) -> dict[str, Arm]:
    raw = read_yaml(path)
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: expected a mapping of arm name -> the config keys it changes "
                          f"(e.g. focal: {{loss: focal}})")
    arms: dict[str, Arm] = {}
    for name, entry in raw.items():
        where = f"{path}: arm {name!r}"
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{path}: arm name {name!r} must be letters, digits, '_' or '-'")
        entry = {} if entry is None else entry
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping of config key -> value, got {entry!r}")
        unknown = sorted(set(entry) - set(FIELD_TYPES) - set(ARM_META_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
                              f"{', '.join(ARM_META_KEYS)}, {', '.join(FIELD_TYPES)}")
        if "seed" in entry:   # the grid gives every arm seeds 0..N-1; an arm's own seed would be overwritten
            raise ConfigError(f"{where}: seed is set by the sweep (--seeds runs seeds 0..N-1 for every arm); "
                              f"remove seed from the arm")
        keys = {k: coerce(k, v, source=where) for k, v in entry.items() if k not in ARM_META_KEYS}
        preset = entry.get("preset")
        if preset is not None and preset not in presets:
            raise ConfigError(f"{where}: preset={preset!r} is not one of: {', '.join(presets)}")
        overrides = {**presets[preset].to_dict(), **keys} if preset is not None else keys
        factor = entry.get("factor") or (f"preset:{preset}" if preset else "+".join(sorted(keys)) or name)
        arms[name] = Arm(name=name, factor=str(factor), overrides=overrides, source=str(path))
    return arms


# --- the Optuna search space --------------------------------------------------------------------------------

OPTUNA_SPACE_FILE = HERE / "optuna_space.yaml"
PARAM_OPTIONS = {"choices", "low", "high", "log", "step", "when"}


@dataclass(frozen=True)
class SearchParam:
    """One suggested TrialConfig key: categorical (`choices`) or numeric (`low`..`high`), maybe conditional."""
    name: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    when: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        from trainable.config import FIELD_TYPES
        return "categorical" if self.choices is not None else FIELD_TYPES[self.name].__name__

    def applies(self, chosen: Mapping[str, Any]) -> bool:
        return all(chosen.get(key) in values for key, values in self.when.items())


@dataclass(frozen=True)
class SearchSpace:
    base_preset: str
    params: tuple[SearchParam, ...]
    source: str

    def base_config(self) -> TrialConfig:
        return load_presets()[self.base_preset]

    def without(self, fixed: Iterable[str]) -> "SearchSpace":
        """The space minus keys fixed elsewhere (--set), and minus params conditional on them."""
        fixed = set(fixed)
        kept = tuple(p for p in self.params if p.name not in fixed and not (set(p.when) & fixed))
        return dataclasses.replace(self, params=kept)


def load_optuna_space(path: str | Path = OPTUNA_SPACE_FILE) -> SearchSpace:
    """The Optuna space, every choice and bound checked against TrialConfig and its registries."""
    raw = read_yaml(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("params"), dict) or not raw["params"]:
        raise ConfigError(f"{path}: expected `base_preset: NAME` and `params:` mapping config key -> "
                          f"{{choices: [...]}} or {{low: x, high: y}}")
    presets = load_presets()
    base_preset = raw.get("base_preset", "chexnet_replica")
    if base_preset not in presets:
        raise ConfigError(f"{path}: base_preset={base_preset!r} is not one of: {', '.join(presets)}")
    base = presets[base_preset].to_dict()
    params: list[SearchParam] = []
    for name, options in raw["params"].items():
        params.append(_search_param(name, options, base, params, f"{path}: param {name!r}"))
    return SearchSpace(base_preset=base_preset, params=tuple(params), source=str(path))


def _search_param(name: str, options: Any, base: Mapping[str, Any], earlier: list[SearchParam],
                  where: str) -> SearchParam:
    if name not in FIELD_TYPES:
        raise ConfigError(f"{where}: not a config key; valid keys: {', '.join(FIELD_TYPES)}")
    if not isinstance(options, dict) or not set(options) <= PARAM_OPTIONS:
        raise ConfigError(f"{where}: expected a mapping with keys from {', '.join(sorted(PARAM_OPTIONS))}, "
                          f"got {options!r}")
    check = lambda value: build_config({**base, name: value}, source=where)  # noqa: E731
    when = _conditions(options.get("when") or {}, earlier, where)
    if "choices" in options:
        choices = options["choices"]
        if choices == "registry":
            if FIELD_TYPES[name] is bool:
                choices = [False, True]
            elif name in CHOICES:
                choices = list(CHOICES[name]())
            else:
                raise ConfigError(f"{where}: choices: registry needs a key with a registry "
                                  f"({', '.join(CHOICES)}) or a bool key")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices must be a non-empty list or 'registry', got {choices!r}")
        choices = [coerce(name, choice, source=where) for choice in choices]
        for choice in choices:
            check(choice)
        return SearchParam(name=name, choices=tuple(choices), when=when)
    if "low" not in options or "high" not in options:
        raise ConfigError(f"{where}: expected either choices or both low and high")
    if FIELD_TYPES[name] not in (int, float):
        raise ConfigError(f"{where}: low/high need a numeric key, {name} is {FIELD_TYPES[name].__name__}; "
                          f"use choices")
    low, high = coerce(name, options["low"], source=where), coerce(name, options["high"], source=where)
    if not low < high:
        raise ConfigError(f"{where}: low={low!r} must be below high={high!r}")
    log = bool(options.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"{where}: log: true needs low > 0, got low={low!r}")
    check(low), check(high)
    step = options.get("step")
    if log and step is not None:
        raise ConfigError(f"{where}: log: true and step cannot be combined (Optuna samples one or the other)")
    return SearchParam(name=name, low=low, high=high, log=log, step=None if step is None else float(step), when=when)


def _conditions(when: Any, earlier: list[SearchParam], where: str) -> dict[str, tuple[Any, ...]]:
    if not isinstance(when, dict):
        raise ConfigError(f"{where}: when must be a mapping of earlier param -> value(s), got {when!r}")
    known = {param.name: param for param in earlier}
    conditions: dict[str, tuple[Any, ...]] = {}
    for key, values in when.items():
        if key not in known or known[key].choices is None:
            raise ConfigError(f"{where}: when names {key!r}, which is not a categorical param defined above it")
        values = tuple(values) if isinstance(values, list) else (values,)
        outside = [value for value in values if value not in known[key].choices]
        if outside:
            raise ConfigError(f"{where}: when {key}={outside[0]!r} is not one of its choices "
                              f"{', '.join(map(str, known[key].choices))}")
        conditions[key] = values
    return conditions
