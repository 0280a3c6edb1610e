"""The data options every CLI offers, built from `DataSpec`'s fields: one list, one parser, one way back.

The trial runner (`python -m trainable`), the sweeps and final training all call `add_data_arguments`; a sweep's
recorded options are `DATA_OPTIONS` (plus `data`), and `data_spec` turns parsed arguments into a `DataSpec`.
A new `DataSpec` field needs its help text here and nothing else.
"""
from __future__ import annotations

import argparse
import dataclasses

from .cache import CACHE_ENV
from .nih import SPLITTERS, VIEW_FILTERS, DataSpec

# Help per DataSpec field (the flag is the field's name with '-' for '_'); choices come from the registries.
_HELP = {
    "split": "official: NIH's test_list.txt as test, validation carved patient-wise from train_val_list.txt; "
             "patient: patient-wise stratified split (default: %(default)s)",
    "val_fraction": "validation share (default: %(default)s)",
    "test_fraction": "test share for --split patient (default: %(default)s)",
    "split_seed": "seed of the patient-wise split (default: %(default)s)",
    "view": "keep only this view position (default: %(default)s)",
    "max_images": "quick subset: whole patients drawn reproducibly up to this many images (0 = all)",
    "skip_missing": "skip (and count) images listed in the CSV but absent on disk instead of failing",
}
_CHOICES = {"split": list(SPLITTERS), "view": list(VIEW_FILTERS)}
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}   # the annotations, as strings
_FIELDS = [f for f in dataclasses.fields(DataSpec) if f.name != "data_dir"]
DATA_DEFAULTS: dict[str, object] = {f.name: f.default for f in _FIELDS}
DATA_OPTIONS: tuple[str, ...] = tuple(DATA_DEFAULTS)   # as argparse names them (dest)
assert set(_HELP) == set(DATA_OPTIONS), "every DataSpec field needs its help text in trainable/data/options.py"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data options (and the node's image cache folder), in a 'data' group of `parser`."""
    group = parser.add_argument_group("data")
    for field in _FIELDS:
        kind = _TYPES[field.type]
        if kind is bool:
            group.add_argument(flag(field.name), action="store_true", help=_HELP[field.name])
        else:
            group.add_argument(flag(field.name), type=kind, default=field.default,
                               choices=_CHOICES.get(field.name), help=_HELP[field.name])
    group.add_argument("--cache-dir", default=None,
                       help=f"decode-once image cache, shared by trials on a node (default: ${CACHE_ENV} or "
                            "~/.cache/cxr-ablate)")


def data_spec(args: argparse.Namespace) -> DataSpec:
    return DataSpec(data_dir=str(args.data), **{name: getattr(args, name) for name in DATA_OPTIONS})

