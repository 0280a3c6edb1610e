"""Command-line options shared by every sweep CLI; each kind of sweep adds its own (see ablation, search)."""
from __future__ import annotations

import argparse
import math
from typing import Any

from trainable.config import TrialConfig
from trainable.data.options import add_data_arguments

LATEST = "latest"
# What may differ when a sweep is resumed: where it runs and logs. Everything else (trial resources too: Tune
# keeps them with each trial) is the recorded sweep's.
RESUMABLE_OPTIONS = ("address", "mlflow_uri", "cache_dir")
EXECUTION_OPTIONS = (*RESUMABLE_OPTIONS, "out", "storage", "resume", "overwrite", "list", "demo")


def non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:       # also refuses nan, which every comparison lets through
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def _int_at_least(lowest: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= {lowest}")
        return value
    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)  # a negative --max-failures would make Tune retry a failing trial forever


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--demo", action="store_true",
                       help="the embedded demo (also what running with no arguments does): generated data, tiny "
                            "model, a few minutes on a laptop")
    sweep.add_argument("--list", action="store_true", help="print the ablation arms and the Optuna space, then exit")
    sweep.add_argument("--name", default=None, help="sweep name: its folder and MLflow experiment "
                                                    "(default: the kind plus a timestamp)")
    sweep.add_argument("--out", default="runs", help="output folder: sweeps, prepared splits and the embedded "
                                                     "MLflow store (default: %(default)s)")
    add_storage_arguments(sweep, storage_default="--out", what="sweep of this kind")
    sweep.add_argument("--overwrite", action="store_true", help="replace an earlier sweep of the same --name")
    sweep.add_argument("--epochs", type=positive_int, default=TrialConfig().epochs,
                       help="epoch budget of every trial (default: %(default)s)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="fix a config key for every trial, over arms and search space, repeatable "
                            "(e.g. --set backbone=resnet18 --set image_size=128)")

    sweep.add_argument("--data", default=None, help="NIH ChestX-ray14 folder (Data_Entry CSV + images)")
    add_data_arguments(parser)

    add_cluster_arguments(parser)

    tracking = parser.add_argument_group("MLflow")
    tracking.add_argument("--mlflow-uri", default=None,
                          help="tracking server, e.g. http://host:5000 (default: $MLFLOW_TRACKING_URI, else "
                               "OUT/mlflow.db, a SQLite file only this driver writes)")
    return parser


def add_storage_arguments(group, *, storage_default: str, what: str) -> None:
    """--storage and --resume: where a run of Tune trials keeps its state, and how an interrupted one continues."""
    group.add_argument("--storage", default=None, metavar="PATH|URI",
                       help=f"Tune storage for checkpoints and experiment state (default: {storage_default}); on a "
                            "multi-node cluster a folder mounted on every node (NFS) or s3://bucket/prefix")
    group.add_argument("--resume", nargs="?", const=LATEST, default=None, metavar="NAME",
                       help=f"continue an interrupted {what}: NAME, or without NAME the most recently created one in "
                            "the storage. Finished trials are kept, running ones continue from their last "
                            "checkpoint, errored ones are retried. It keeps its recorded arguments; only "
                            f"{', '.join('--' + o.replace('_', '-') for o in RESUMABLE_OPTIONS)} may change (give "
                            "the same --out/--storage)")


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Where and with what the trials run: shared by the sweeps and final training."""
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--address", default=None,
                         help="Ray cluster to join, e.g. auto (default: $RAY_ADDRESS, else a local Ray)")
    cluster.add_argument("--cpus-per-trial", type=non_negative_float, default=1.0, help="(default: %(default)s)")
    cluster.add_argument("--gpus-per-trial", type=non_negative_float, default=0.0,
                         help="fractions share a GPU, e.g. 0.25 runs four small trials per GPU (default: %(default)s)")
    cluster.add_argument("--max-concurrent", type=non_negative_int, default=0,
                         help="at most this many trials at once (default: 0 = as many as resources allow)")
    cluster.add_argument("--max-failures", type=non_negative_int, default=1,
                         help="retries of a trial whose worker died or raised, each from its last checkpoint "
                              "(default: %(default)s)")


def apply_defaults(parser: argparse.ArgumentParser, argv: list[str], demo_defaults: dict[str, Any]
                   ) -> argparse.Namespace:
    """Parse argv; with no arguments at all, or --demo, the demo's values become the defaults."""
    argv = list(argv) or ["--demo"]
    if "--demo" in argv:
        parser.set_defaults(**demo_defaults)
    return parser.parse_args(argv)
