"""The one runner behind every sweep CLI.

Order matters: everything a user can get wrong (arguments, arms file, search space, MLflow URI, data) is checked
before Ray starts; then the cluster's resources and storage; only then is the parent run created and Tune run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Protocol

import mlflow
import ray
from ray import tune
from ray.tune import CLIReporter

from search_spaces import OPTUNA_SPACE_FILE
from trainable.__main__ import data_spec
from trainable.config import parse_overrides
from trainable.data.nih import PreparedData, prepare_dataset
from trainable.errors import ConfigError, UserError
from trainable.tune import TrialContext, run_trial

from .catalog import describe
from .cluster import check_resources, check_shared_storage, start_ray
from .demo import demo_data
from .mlflow_logger import FAILED, FINISHED, KILLED, MLflowTrialLogger
from .naming import TrialDescriber, tune_trial_dirname, tune_trial_name
from .options import EXECUTION_OPTIONS, LATEST, apply_defaults, build_parser
from .record import SweepLocation, SweepRecord, check_name, default_name, latest_sweep, storage_root
from .report import METRIC, MODE, SweepReport, unfinished_count
from .tracking import SweepRun, artifact_location, connect, git_commit, mask_secrets, resolve_tracking_uri, ui_command

REPO_ROOT = Path(__file__).resolve().parents[1]
PROGRESS_METRICS = {"epoch": "epoch", "val_loss": "val loss", METRIC: "AUC", "val_f1_mean": "F1"}
PROGRESS_EVERY_S = 30


class SweepKind(Protocol):
    """What differs between an ablation and a search (see ablation.Ablation, search.Search)."""
    kind: str
    description: str
    demo_defaults: dict[str, Any]
    plan_record: dict[str, Any]

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def param_space(self) -> dict[str, Any]: ...
    def tune_options(self) -> dict[str, Any]: ...
    def context(self, data: PreparedData, cache_dir: str | None) -> TrialContext: ...
    def describer(self, context: TrialContext) -> TrialDescriber: ...
    def report(self, results: tune.ResultGrid, *, title: str, epochs: int, describer: TrialDescriber
               ) -> SweepReport: ...


def main(kind: type, argv: list[str] | None = None) -> int:
    parser = build_parser(f"python sweeps/run_{kind.kind}.py", kind.description)
    kind.add_arguments(parser)
    args = apply_defaults(parser, sys.argv[1:] if argv is None else argv, kind.demo_defaults)
    try:
        if args.list:
            print(describe(getattr(args, "arms_file", None), getattr(args, "space_file", None) or OPTUNA_SPACE_FILE))
            return 0
        return run(kind, args, parser)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(kind: type, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    out = Path(args.out)
    storage = storage_root(args.storage, out)
    location, record = _locate(kind.kind, args, parser, storage)
    if args.demo and args.data is None:
        args.data = str(demo_data(out).resolve())
    if args.data is None:
        raise ConfigError("--data is required: the NIH ChestX-ray14 folder (or run with no arguments for the demo)")
    plan: SweepKind = kind(args, _sweep_overrides(args))
    if record is not None and record.plan != plan.plan_record:
        raise ConfigError(f"--resume {location.name}: the arms or search space changed since the sweep started "
                          f"(see plan in {location.path}/sweep.json); resume with the same files")
    uri = resolve_tracking_uri(args.mlflow_uri, out)
    client = connect(uri)
    local_dir = out / location.name
    if args.overwrite and record is None:
        location.remove()
        shutil.rmtree(local_dir, ignore_errors=True)
    data = prepare_dataset(data_spec(args), local_dir)
    if record is not None and record.data.get("fingerprint") != data.fingerprint:
        raise ConfigError(f"--resume {location.name}: the data changed since the sweep started (fingerprint "
                          f"{data.fingerprint}, recorded {record.data.get('fingerprint')})")
    for note in getattr(plan, "notes", []):
        print(note)
    label = "SYNTHETIC data (generated, not NIH)" if data.synthetic else "NIH ChestX-ray14"
    print(f"{kind.kind} {location.name!r}: {label}, fingerprint {data.fingerprint}, split sizes "
          f"{ {name: size['images'] for name, size in data.split_sizes().items()} } images", flush=True)

    start_ray(args.address)
    try:
        check_resources(args.cpus_per_trial, args.gpus_per_trial)
        check_shared_storage(storage, storage_given=args.storage is not None)
        sweep_run = _parent_run(client, uri, args, location, record, plan, data)
        mlflow.set_tracking_uri(uri)  # the logger callback reads it; it is never pickled into Tune's state
        return _fit(plan, args, location, sweep_run, data, uri, resumed=record is not None)
    finally:
        ray.shutdown()


# --- before Ray -----------------------------------------------------------------------------------------------

def _locate(kind: str, args: argparse.Namespace, parser: argparse.ArgumentParser, storage: str
            ) -> tuple[SweepLocation, SweepRecord | None]:
    """The sweep's folder; on --resume also its record, whose arguments replace the command line's."""
    if not args.resume:
        location = SweepLocation(storage, check_name(args.name or default_name(kind)))
        if location.exists() and not args.overwrite:
            raise ConfigError(f"sweep {location.name!r} already exists in {storage}: --resume {location.name} "
                              f"continues it, --overwrite replaces it, --name picks another name")
        return location, None
    name = latest_sweep(storage, kind) if args.resume == LATEST else args.resume
    if name is None:
        raise ConfigError(f"--resume: no {kind} sweep in {storage} to resume (give --out/--storage of the sweep)")
    location = SweepLocation(storage, check_name(name))
    record = location.read()
    if record is None or record.kind != kind:
        raise ConfigError(f"--resume {name}: no {kind} sweep recorded at {location.path}/sweep.json")
    for key, recorded in record.arguments.items():
        current = getattr(args, key, None)
        if current != parser.get_default(key) and current != recorded:
            raise ConfigError(f"--resume {name}: --{key.replace('_', '-')} {current!r} differs from the sweep's "
                              f"{recorded!r}; a resumed sweep keeps its arguments")
        setattr(args, key, recorded)
    args.name = record.name
    print(f"resuming {kind} {name!r} from {location.path}", flush=True)
    return location, record


def _sweep_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = parse_overrides(args.set)
    if "epochs" in overrides:
        raise ConfigError("--set epochs: the epoch budget of a sweep is --epochs")
    return {**overrides, "epochs": args.epochs}


def _sweep_arguments(args: argparse.Namespace) -> dict[str, Any]:
    return {key: value for key, value in vars(args).items() if key not in EXECUTION_OPTIONS}


# --- the parent run ---------------------------------------------------------------------------------------------

def _parent_run(client, uri: str, args: argparse.Namespace, location: SweepLocation, record: SweepRecord | None,
                plan: SweepKind, data: PreparedData) -> SweepRun:
    if record is not None:
        return SweepRun.reopen(client, location.name, record.mlflow["experiment_id"], record.mlflow["parent_run_id"],
                               uri)
    commit = git_commit(REPO_ROOT)
    sizes = {f"split_{name}_{unit}": count for name, size in data.split_sizes().items() for unit, count in size.items()}
    params = {**{k: v for k, v in vars(args).items() if k not in ("resume", "list")}, **sizes,
              "data_fingerprint": data.fingerprint,
              "git_commit": commit, "sweep_path": location.path}
    tags = {"kind": plan.kind, "data": "SYNTHETIC" if data.synthetic else "NIH", "synthetic_data": data.synthetic,
            "data_fingerprint": data.fingerprint, "git_commit": commit, "sweep_path": mask_secrets(location.path),
            "ray_version": ray.__version__}
    sweep_run = SweepRun.start(client, location.name, artifact_root=artifact_location(uri, Path(args.out)),
                               params={k: v for k, v in params.items() if v is not None}, tags=tags,
                               replace=args.overwrite)
    location.write(SweepRecord(
        kind=plan.kind, name=location.name, arguments=_sweep_arguments(args), plan=plan.plan_record,
        data={"fingerprint": data.fingerprint, "synthetic": data.synthetic, "sizes": data.split_sizes(),
              "split_csv": str(data.split_csv)},
        mlflow={"experiment_id": sweep_run.experiment_id, "parent_run_id": sweep_run.parent_run_id,
                "tracking_uri": mask_secrets(uri)}))
    return sweep_run


# --- Tune -----------------------------------------------------------------------------------------------------

def _fit(plan: SweepKind, args: argparse.Namespace, location: SweepLocation, sweep_run: SweepRun,
         data: PreparedData, uri: str, *, resumed: bool) -> int:
    context = plan.context(data, args.cache_dir)
    describer = plan.describer(context)
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
                                    {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
    # The new output engine ignores a passed-in progress reporter; the CLIReporter shows arm/seed and AUC/F1.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # num_to_keep makes Tune snapshot its state at every checkpoint, which resume wants; without this, Tune
    # warns about those snapshots every few seconds.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if resumed:
        if not tune.Tuner.can_restore(location.path):
            raise ConfigError(f"--resume {location.name}: {location.path} holds no Tune experiment state to resume")
        tuner = tune.Tuner.restore(location.path, trainable=trainable, resume_errored=True)
    else:
        logger = MLflowTrialLogger(experiment_id=sweep_run.experiment_id, parent_run_id=sweep_run.parent_run_id,
                                   describer=describer)
        tuner = tune.Tuner(
            trainable, param_space=plan.param_space(),
            tune_config=tune.TuneConfig(**plan.tune_options(), max_concurrent_trials=args.max_concurrent or None,
                                        reuse_actors=True, trial_name_creator=tune_trial_name,
                                        trial_dirname_creator=tune_trial_dirname),
            run_config=tune.RunConfig(
                name=location.name, storage_path=location.storage, callbacks=[logger], verbose=1,
                progress_reporter=CLIReporter(parameter_columns=getattr(plan, "progress_parameters", None),
                                              metric_columns=PROGRESS_METRICS,
                                              max_report_frequency=PROGRESS_EVERY_S),
                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                # the latest checkpoint is all that retries, resume and the MLflow artifacts need
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    try:
        results = tuner.fit()
    except BaseException as err:
        sweep_run.set_tags({"error": f"{type(err).__name__}: {err}"[:500]})
        sweep_run.end(KILLED if isinstance(err, KeyboardInterrupt) else FAILED)
        raise
    return _finish(plan, args, location, sweep_run, data, uri, results, describer)


def _finish(plan: SweepKind, args: argparse.Namespace, location: SweepLocation, sweep_run: SweepRun,
            data: PreparedData, uri: str, results: tune.ResultGrid, describer: TrialDescriber) -> int:
    synthetic = " — SYNTHETIC data (generated, not NIH)" if data.synthetic else ""
    title = f"{plan.kind} {location.name!r}{synthetic} — data {data.fingerprint}"
    report = plan.report(results, title=title, epochs=args.epochs, describer=describer)
    print("\n" + report.text, flush=True)
    for file_name, text in {**report.files, f"{plan.kind}_summary.txt": report.text + "\n"}.items():
        location.write_text(file_name, text)
        sweep_run.log_text(text, file_name)
    sweep_run.set_tags(report.tags)
    unfinished = unfinished_count(results)
    if unfinished:
        sweep_run.set_tags({"interrupted": "true"})
        sweep_run.end(KILLED)
        print(f"\ninterrupted with {unfinished} trial(s) unfinished; continue with: python sweeps/run_{plan.kind}.py "
              f"--resume {location.name} --out {args.out}" + (f" --storage {args.storage}" if args.storage else ""))
    else:
        sweep_run.set_tags({"interrupted": "false"})
        sweep_run.end(FINISHED)
    print(f"\nfiles: {location.path}\nMLflow experiment {location.name!r}; browse it with:\n  {ui_command(uri)}",
          flush=True)
    return 1 if unfinished or results.num_errors else 0
