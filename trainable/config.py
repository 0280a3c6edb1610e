"""TrialConfig: the one flat contract between search spaces, the trainable, MLflow params and final training.

Defaults are the CheXNet replica. Every categorical factor is checked against the registry that implements it,
so a typo fails before any trial starts, with the valid choices in the message.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .errors import ConfigError


@dataclass(frozen=True)
class TrialConfig:
    # model
    backbone: str = "densenet121"         # timm name | hf-hub:ORG/NAME | local-dir:/FOLDER | xrv:WEIGHTS (backbones.py)
    pretrained: str = "imagenet"          # none | imagenet (the backbone's own weights) | a local weights file
    head: str = "linear"                  # registry: trainable.models.HEADS
    head_dropout: float = 0.3             # dropout inside the cbam head's dense layers
    drop_rate: float = 0.0                # dropout before the linear head's classifier (timm's drop_rate too)
    demographics: str = "none"            # registry: trainable.data.demographics.DEMOGRAPHICS
    # loss
    loss: str = "bce"                     # registry: trainable.losses.LOSSES
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25             # < 0 disables the alpha balance (torchvision convention)
    dwbce_smoothing: float = 0.1          # dynamic_weighted_bce: batch ratio pulled toward 0.5 by this factor
    asl_gamma_neg: float = 4.0
    asl_gamma_pos: float = 1.0
    # optimisation
    optimizer: str = "adam"               # any timm optimizer name, or trainable.optim.OPTIMIZERS (pesg)
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: str = "plateau"            # registry: trainable.optim.SCHEDULERS
    plateau_factor: float = 0.1
    plateau_patience: int = 1
    warmup_epochs: int = 0
    epochs: int = 10
    batch_size: int = 16
    early_stop_patience: int = 0          # epochs without val AUC gain before stopping; 0 disables
    # augmentation (batched, on the trial's device)
    aug_hflip: bool = True
    aug_resized_crop: bool = False
    aug_crop_scale_min: float = 0.7
    aug_color_jitter: bool = False
    aug_brightness: float = 0.2
    aug_contrast: float = 0.2
    aug_rotation: bool = False
    aug_rotation_degrees: float = 10.0
    # sampling
    oversample: str = "none"              # registry: trainable.data.loader.OVERSAMPLERS
    oversample_power: float = 0.5
    # run
    image_size: int = 224
    seed: int = 0
    precision: str = "fp32"               # fp32 | bf16
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False           # bit-for-bit repeatable on a GPU (deterministic kernels, no cuDNN autotuning)

    def __post_init__(self) -> None:
        _validate(self)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> "TrialConfig":
        """Build from a mapping of flat keys; values may be strings (from `--set` or YAML) and are coerced."""
        unknown = sorted(set(values) - set(FIELD_TYPES))
        if unknown:
            raise ConfigError(
                f"{source}: unknown config key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(FIELD_TYPES)}")
        try:
            return cls(**{k: coerce(k, v, source=source) for k, v in values.items()})
        except ConfigError as err:  # range/registry errors are raised as "config: ..."; name the real source
            message = str(err)
            raise ConfigError(f"{source}:{message[len('config:'):]}" if message.startswith("config:")
                              else message) from None

    def replace(self, **overrides: Any) -> "TrialConfig":
        merged = {**self.to_dict(), **overrides}
        return TrialConfig.from_dict(merged)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


FIELD_TYPES: dict[str, type] = {f.name: f.type if isinstance(f.type, type) else eval(f.type)  # noqa: S307
                                for f in fields(TrialConfig)}


def coerce(key: str, value: Any, *, source: str = "config") -> Any:
    """Turn a `--set`/YAML value into the field's type, or raise naming the key and the expected type."""
    if key not in FIELD_TYPES:
        raise ConfigError(f"{source}: unknown config key {key!r}; valid keys: {', '.join(FIELD_TYPES)}")
    kind = FIELD_TYPES[key]
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):   # OverflowError: int('inf')
        raise ConfigError(f"{source}: {key}={value!r} is not a valid {kind.__name__}") from None


# --- validation ---------------------------------------------------------------------------------

def _registry_keys(module: str, name: str) -> Callable[[], Iterable[str]]:
    # Imported lazily: the registries live beside the code they select, which imports torch/timm.
    def keys() -> Iterable[str]:
        import importlib
        return importlib.import_module(module).__dict__[name].keys()
    return keys


def _optimizers() -> Iterable[str]:
    from timm.optim import list_optimizers

    from .optim import OPTIMIZERS
    return [*list_optimizers(), *OPTIMIZERS]


CHOICES: dict[str, Callable[[], Iterable[str]]] = {
    "head": _registry_keys("trainable.models", "HEADS"),
    "demographics": _registry_keys("trainable.data.demographics", "DEMOGRAPHICS"),
    "loss": _registry_keys("trainable.losses", "LOSSES"),
    "optimizer": _optimizers,
    "scheduler": _registry_keys("trainable.optim", "SCHEDULERS"),
    "oversample": _registry_keys("trainable.data.loader", "OVERSAMPLERS"),
    "precision": lambda: ("fp32", "bf16"),
}


@dataclass(frozen=True)
class Range:
    """The values a numeric key may take: finite, between low and high (each end included unless marked open)."""
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):    # nan passes every comparison check
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        return f"{'>' if self.low_open else '>='} {_number(self.low)} and {'<' if self.high_open else '<='} " \
               f"{_number(self.high)}"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


MAX_SEED = 2**32 - 1          # numpy's legacy seeding takes 32 bits; larger seeds overflow
MAX_IMAGE_SIZE = 2048         # twice NIH's 1024 px: beyond it a trial only decodes and holds upsampled pixels
# Every numeric key, so nan, inf and absurd values are refused before a trial starts (bounds wide enough for
# any setting a paper used; an lr of 1e6 still makes a loss explode, which the divergence tests rely on).
RANGES: dict[str, Range] = {
    "lr": Range(0.0, 1e6, low_open=True), "weight_decay": Range(0.0, 10.0), "momentum": Range(0.0, 1.0),
    "plateau_factor": Range(0.0, 1.0, low_open=True), "plateau_patience": Range(0, 10_000),
    "warmup_epochs": Range(0, 10_000), "epochs": Range(0, 10_000, low_open=True),
    "batch_size": Range(0, 65_536, low_open=True),
    "early_stop_patience": Range(0, 10_000), "image_size": Range(16, MAX_IMAGE_SIZE), "seed": Range(0, MAX_SEED),
    "focal_gamma": Range(0.0, 100.0), "focal_alpha": Range(-1.0, 1.0), "dwbce_smoothing": Range(0.0, 1.0),
    "asl_gamma_neg": Range(0.0, 100.0), "asl_gamma_pos": Range(0.0, 100.0), "head_dropout": Range(0.0, 1.0),
    "drop_rate": Range(0.0, 1.0), "aug_crop_scale_min": Range(0.0, 1.0, low_open=True),
    "aug_brightness": Range(0.0, 1.0), "aug_contrast": Range(0.0, 1.0), "aug_rotation_degrees": Range(0.0, 180.0),
    "oversample_power": Range(0.0, 10.0),
}


def _validate(cfg: TrialConfig) -> None:
    for key, kind in FIELD_TYPES.items():
        value = getattr(cfg, key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(cfg, key, float(value))
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"config: {key}={value!r} is not a valid {kind.__name__}")
    for key, choices in CHOICES.items():
        valid = list(choices())
        if getattr(cfg, key) not in valid:
            raise ConfigError(f"config: {key}={getattr(cfg, key)!r} is not one of: {', '.join(valid)}")
    for key, allowed in RANGES.items():
        if not allowed.holds(getattr(cfg, key)):
            raise ConfigError(f"config: {key}={getattr(cfg, key)!r} must be {allowed.describe()}")
    _validate_backbone(cfg)
    _validate_pairs(cfg)


# (key, value) -> (key, value) it needs: LibAUC's min-max loss and its optimizer only work together.
REQUIRES: dict[tuple[str, str], tuple[str, str]] = {("loss", "aucm"): ("optimizer", "pesg"),
                                                     ("optimizer", "pesg"): ("loss", "aucm")}


def _validate_pairs(cfg: TrialConfig) -> None:
    for (key, value), (needed_key, needed) in REQUIRES.items():
        if getattr(cfg, key) == value and getattr(cfg, needed_key) != needed:
            raise ConfigError(f"config: {key}={value!r} needs {needed_key}={needed!r} (LibAUC's AUC-margin loss is "
                              f"optimised by its PESG, which also updates the loss's own variables), not "
                              f"{needed_key}={getattr(cfg, needed_key)!r}")


def _validate_backbone(cfg: TrialConfig) -> None:
    if cfg.pretrained not in ("none", "imagenet") and not Path(cfg.pretrained).is_file():
        raise ConfigError(
            f"config: pretrained={cfg.pretrained!r} must be 'none', 'imagenet' or an existing weights file")
    from .backbones import validate_backbone   # torch and timm load lazily, as for the registries
    validate_backbone(cfg)


def parse_overrides(pairs: Iterable[str], *, source: str = "--set") -> dict[str, Any]:
    """Parse `key=value` strings (CLI `--set`) into typed values, naming the offending pair on error."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{source} {pair!r}: expected key=value")
        out[key.strip()] = coerce(key.strip(), value.strip(), source=f"{source} {pair!r}")
    return out
