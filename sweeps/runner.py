"""The one runner behind every sweep CLI (run_ablation.py, run_search.py).

Order matters: everything a user can get wrong (arguments, arms file, search space, MLflow store, data) is
checked before Ray starts; then the cluster's storage and resources; only then are the parent run and Tune
started. What differs between an ablation and a search is a SweepKind (ablation.Ablation, search.Search).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import mlflow
import ray
from mlflow import MlflowClient
from ray import tune
from ray.tune import CLIReporter

from search_spaces import OPTUNA_SPACE_FILE
from trainable.__main__ import data_spec
from trainable.config import parse_overrides
from trainable.data.cache import check_png_files
from trainable.data.nih import PreparedData, prepare_dataset
from trainable.errors import ConfigError, UserError
from trainable.tune import TrialContext, run_trial

from .catalog import describe
from .cluster import check_resources, check_shared_storage, start_ray
from .demo import demo_data
from .failures import NoRetryForDeterministic, cause_of, is_bad_input, registry_name, start_registry
from .mlflow_logger import FAILED, FINISHED, KILLED, MLflowTrialLogger
from .naming import TrialDescriber, tune_trial_dirname, tune_trial_name
from .options import EXECUTION_OPTIONS, LATEST, apply_defaults, build_parser
from .record import SweepLocation, SweepRecord, check_name, default_name, latest_sweep, storage_root
from .report import METRIC, SweepReport, unfinished_trials
from .tracking import SweepRun, artifact_location, connect, git_commit, mask_secrets, resolve_tracking_uri, ui_command

REPO_ROOT = Path(__file__).resolve().parents[1]
PROGRESS_METRICS = {"epoch": "epoch", "val_loss": "val loss", METRIC: "AUC", "val_f1_mean": "F1"}
PROGRESS_EVERY_S = 30


class SweepKind(Protocol):
    """What differs between an ablation and a search."""
    kind: str
    description: str
    demo_defaults: dict[str, Any]
    plan_record: dict[str, Any]            # JSON: recorded in sweep.json, compared on --resume
    notes: list[str]                       # printed before the sweep starts
    progress_parameters: list[str]         # config keys shown in the live progress table

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def param_space(self) -> dict[str, Any]: ...
    def tune_options(self) -> dict[str, Any]: ...
    def context(self, data: PreparedData, cache_dir: str | None) -> TrialContext: ...
    def describer(self, context: TrialContext) -> TrialDescriber: ...
    def report(self, results: tune.ResultGrid, *, title: str, epochs: int, describer: TrialDescriber
               ) -> SweepReport: ...


@dataclass
class Sweep:
    """One sweep being run: its arguments, plan, folder, MLflow store and data."""
    args: argparse.Namespace
    plan: SweepKind
    location: SweepLocation
    record: SweepRecord | None             # set when resuming
    uri: str
    client: MlflowClient
    data: PreparedData

    @property
    def resumed(self) -> bool:
        return self.record is not None


def main(kind: type, argv: list[str] | None = None) -> int:
    parser = build_parser(f"python sweeps/run_{kind.kind}.py", kind.description)
    kind.add_arguments(parser)
    args = apply_defaults(parser, sys.argv[1:] if argv is None else argv, kind.demo_defaults)
    try:
        if args.list:
            print(describe(getattr(args, "arms_file", None), getattr(args, "space_file", None) or OPTUNA_SPACE_FILE))
            return 0
        return run(prepare(kind, args, parser))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


# --- before Ray -----------------------------------------------------------------------------------------------

def prepare(kind: type, args: argparse.Namespace, parser: argparse.ArgumentParser) -> Sweep:
    """Every check that needs no cluster, then the data split (written into OUT/<name>/)."""
    out = Path(args.out)
    location, record = _locate(kind.kind, args, parser, storage_root(args.storage, out))
    if args.demo and args.data is None:
        args.data = str(demo_data(out))
    if args.data is None:
        raise ConfigError("--data is required: the NIH ChestX-ray14 folder (or --demo, or no arguments at all, "
                          "for the demo on generated data)")
    # Trials run in their own folders (and a resumed sweep maybe elsewhere): only absolute paths travel.
    args.data = str(Path(args.data).expanduser().resolve())
    args.cache_dir = str(Path(args.cache_dir).expanduser().resolve()) if args.cache_dir else None
    plan: SweepKind = kind(args, _sweep_overrides(args))
    if record is not None and record.plan != plan.plan_record:
        raise ConfigError(f"--resume {location.name}: the arms or search space changed since the sweep started "
                          f"(see plan in {location.path}/sweep.json); resume with the same files")
    uri = resolve_tracking_uri(args.mlflow_uri, out)
    client = connect(uri)
    if args.overwrite and record is None:
        location.remove()
        shutil.rmtree(out / location.name, ignore_errors=True)
    data = prepare_dataset(data_spec(args), out / location.name)
    check_png_files(data.frame["path"])
    if record is not None and record.data.get("fingerprint") != data.fingerprint:
        raise ConfigError(f"--resume {location.name}: the data changed since the sweep started (fingerprint "
                          f"{data.fingerprint}, recorded {record.data.get('fingerprint')})")
    return Sweep(args=args, plan=plan, location=location, record=record, uri=uri, client=client, data=data)


def _locate(kind: str, args: argparse.Namespace, parser: argparse.ArgumentParser, storage: str
            ) -> tuple[SweepLocation, SweepRecord | None]:
    """The sweep's folder; on --resume also its record, whose arguments replace the command line's."""
    if not args.resume:
        location = SweepLocation(storage, check_name(args.name or default_name(kind)))
        if location.exists() and not args.overwrite:
            raise ConfigError(f"sweep {location.name!r} already exists in {storage}: --resume {location.name} "
                              f"continues it, --overwrite replaces it, --name picks another name")
        return location, None
    return locate_resumed(kind, args, parser, storage)


def locate_resumed(kind: str, args: argparse.Namespace, parser: argparse.ArgumentParser, storage: str
                   ) -> tuple[SweepLocation, SweepRecord]:
    """The folder and record of the run `--resume` names (or the latest of this kind); the recorded arguments
    replace the command line's, and one given here that differs from them is refused."""
    name = latest_sweep(storage, kind) if args.resume == LATEST else args.resume
    if name is None:
        raise ConfigError(f"--resume: no {kind} sweep in {storage} to resume (give --out/--storage of the sweep)")
    location = SweepLocation(storage, check_name(name))
    record = location.read()
    if record is None or record.kind != kind:
        raise ConfigError(f"--resume {name}: no {kind} sweep recorded at {location.path}/sweep.json")
    if not tune.Tuner.can_restore(location.path):
        raise ConfigError(f"--resume {name}: {location.path} holds no Tune state (the sweep stopped before Tune "
                          f"started); start it again with --name {name} --overwrite")
    for key, recorded in record.arguments.items():
        current = getattr(args, key, None)
        if current != parser.get_default(key) and current != recorded:
            raise ConfigError(f"--resume {name}: --{key.replace('_', '-')} {current!r} differs from the sweep's "
                              f"{recorded!r}; a resumed sweep keeps its arguments")
        setattr(args, key, recorded)
    print(f"resuming {kind} {name!r} from {location.path}", flush=True)
    return location, record


def _sweep_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """--set and --epochs: applied to every trial, over arms and search space."""
    overrides = parse_overrides(args.set)
    if "epochs" in overrides:
        raise ConfigError("--set epochs: the epoch budget of a sweep is --epochs")
    return {**absolute_local_paths(overrides), "epochs": args.epochs}


def absolute_local_paths(overrides: dict[str, Any]) -> dict[str, Any]:
    """Trials run in their own folders: a local weights file or model folder given relative travels absolute."""
    overrides = dict(overrides)
    for key in ("pretrained", "backbone"):
        value = overrides.get(key)
        if isinstance(value, str) and value not in ("none", "imagenet") and Path(value).expanduser().exists():
            overrides[key] = str(Path(value).expanduser().resolve())
    return overrides


# --- on the cluster -----------------------------------------------------------------------------------------------

def run(sweep: Sweep) -> int:
    for note in sweep.plan.notes:
        print(note)
    sizes = {name: size["images"] for name, size in sweep.data.split_sizes().items()}
    label = "SYNTHETIC data (generated, not NIH)" if sweep.data.synthetic else "NIH ChestX-ray14"
    print(f"{sweep.plan.kind} {sweep.location.name!r}: {label}, fingerprint {sweep.data.fingerprint}, "
          f"images per split {sizes}", flush=True)
    for note in sweep.data.notes():
        print(note, flush=True)
    with cluster_session(sweep.args, sweep.location):
        parent = _reopen_parent(sweep) if sweep.resumed else _start_parent(sweep)
        mlflow.set_tracking_uri(sweep.uri)   # read by the logger callback; never pickled into Tune's state
        return _fit(sweep, parent)


@contextlib.contextmanager
def cluster_session(args: argparse.Namespace, location: SweepLocation) -> Iterator[None]:
    """Ray joined (or started), checked for the run's storage and trial resources, with the run's no-retry
    registry held for as long as the block runs; Ray is shut down on the way out."""
    start_ray(args.address)
    try:
        check_shared_storage(location.storage, storage_given=args.storage is not None)
        check_resources(args.cpus_per_trial, args.gpus_per_trial)
        registry = start_registry(location.name)  # noqa: F841 - held: the actor lives as long as this handle
        yield
    finally:
        ray.shutdown()


def _start_parent(sweep: Sweep) -> SweepRun:
    """The parent run (arguments, data fingerprint, split sizes, git commit), then sweep.json pointing at it."""
    args, data, location = sweep.args, sweep.data, sweep.location
    commit = git_commit(REPO_ROOT)
    sizes = {f"split_{name}_{unit}": count for name, size in data.split_sizes().items() for unit, count in size.items()}
    params = {**{k: v for k, v in vars(args).items() if k not in ("resume", "list") and v is not None}, **sizes,
              "data_fingerprint": data.fingerprint, "git_commit": commit, "sweep_path": location.path}
    tags = {"kind": sweep.plan.kind, "data": "SYNTHETIC" if data.synthetic else "NIH", "synthetic_data": data.synthetic,
            "data_fingerprint": data.fingerprint, "git_commit": commit, "sweep_path": mask_secrets(location.path),
            "ray_version": ray.__version__}
    parent = SweepRun.start(sweep.client, location.name, artifact_root=artifact_location(sweep.uri, Path(args.out)),
                            params=params, tags=tags, replace=args.overwrite)
    location.write(SweepRecord(
        kind=sweep.plan.kind, name=location.name, plan=sweep.plan.plan_record,
        arguments={key: value for key, value in vars(args).items() if key not in EXECUTION_OPTIONS},
        data={"fingerprint": data.fingerprint, "synthetic": data.synthetic, "sizes": data.split_sizes()},
        mlflow={"experiment_id": parent.experiment_id, "parent_run_id": parent.parent_run_id,
                "tracking_uri": mask_secrets(sweep.uri)}))
    return parent


def _reopen_parent(sweep: Sweep) -> SweepRun:
    return SweepRun.reopen(sweep.client, sweep.location.name, sweep.record.mlflow["experiment_id"],
                           sweep.record.mlflow["parent_run_id"], sweep.uri)


def _tuner(sweep: Sweep, parent: SweepRun, context: TrialContext, describer: TrialDescriber) -> tune.Tuner:
    logger = MLflowTrialLogger(experiment_id=parent.experiment_id, parent_run_id=parent.parent_run_id,
                               describer=describer)
    return build_tuner(sweep.args, sweep.location, context, logger, resumed=sweep.resumed,
                       param_space=sweep.plan.param_space(), tune_options=sweep.plan.tune_options(),
                       progress_parameters=sweep.plan.progress_parameters)


def build_tuner(args: argparse.Namespace, location: SweepLocation, context: TrialContext, logger: MLflowTrialLogger,
                *, resumed: bool, param_space: dict[str, Any], tune_options: dict[str, Any],
                progress_parameters: list[str], checkpoint_config: tune.CheckpointConfig | None = None
                ) -> tune.Tuner:
    """The Tuner of every run of trials (sweeps, final training): trainable.tune.run_trial with the run's
    resources, the MLflow logger and no-retry callbacks, Tune's progress table, retries and checkpoints."""
    # tune.with_parameters sends the context (split table included) through the object store once
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
                                    {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
    # The new output engine ignores a passed-in progress reporter; the CLIReporter shows arm/seed and AUC/F1.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # num_to_keep makes Tune save its state at every checkpoint, which resume wants; Tune would warn about it.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if resumed:   # Tune's saved state has the rest, the MLflow logger included
        return tune.Tuner.restore(location.path, trainable=trainable, resume_errored=True)
    no_retry = NoRetryForDeterministic(location.name, args.max_failures)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(**{"max_concurrent_trials": args.max_concurrent or None, **tune_options},
                                    reuse_actors=True, trial_name_creator=tune_trial_name,
                                    trial_dirname_creator=tune_trial_dirname),
        run_config=tune.RunConfig(
            name=location.name, storage_path=location.storage, callbacks=[logger, no_retry], verbose=1,
            progress_reporter=CLIReporter(parameter_columns=progress_parameters, metric_columns=PROGRESS_METRICS,
                                          max_report_frequency=PROGRESS_EVERY_S),
            failure_config=tune.FailureConfig(max_failures=args.max_failures),
            # the latest checkpoint is all that retries, resume and the MLflow artifacts need
            checkpoint_config=checkpoint_config or tune.CheckpointConfig(num_to_keep=1)))


def _fit(sweep: Sweep, parent: SweepRun) -> int:
    context = dataclasses.replace(sweep.plan.context(sweep.data, sweep.args.cache_dir),
                                  failure_registry=registry_name(sweep.location.name))
    describer = sweep.plan.describer(context)
    try:
        results = _tuner(sweep, parent, context, describer).fit()
    except BaseException as err:
        parent.set_tags({"error": f"{type(err).__name__}: {err}"[:500]})
        parent.end(KILLED if isinstance(err, KeyboardInterrupt) else FAILED)
        raise
    unfinished = unfinished_trials(sweep.location.path)
    if unfinished:
        _interrupted(sweep, parent, unfinished)
    else:
        _report(sweep, parent, results, describer)
    print(f"\nfiles: {sweep.location.path}\nMLflow experiment {sweep.location.name!r}; browse it with:\n  "
          f"{ui_command(sweep.uri)}", flush=True)
    return exit_code(results, unfinished)


def exit_code(results: tune.ResultGrid, unfinished: list[str]) -> int:
    """0: every trial finished; 2: some trial failed on bad input (config, data, weights); 1: otherwise."""
    bad = [result for result in results if result.error is not None and is_bad_input(result.error)]
    if bad:
        first = " ".join(str(cause_of(bad[0].error)).split())[:300]
        print(f"error: {len(bad)} trial(s) failed on bad input, each once (not retried); first: {first}",
              file=sys.stderr, flush=True)
        return 2
    return 1 if unfinished or results.num_errors else 0


def _report(sweep: Sweep, parent: SweepRun, results: tune.ResultGrid, describer: TrialDescriber) -> None:
    synthetic = " — SYNTHETIC data (generated, not NIH)" if sweep.data.synthetic else ""
    title = f"{sweep.plan.kind} {sweep.location.name!r}{synthetic} — data {sweep.data.fingerprint}"
    report = sweep.plan.report(results, title=title, epochs=sweep.args.epochs, describer=describer)
    print("\n" + report.text, flush=True)
    for file_name, text in {**report.files, f"{sweep.plan.kind}_summary.txt": report.text + "\n"}.items():
        sweep.location.write_text(file_name, text)
        parent.log_text(text, file_name)
    parent.set_tags({**report.tags, "interrupted": "false"})
    parent.end(FINISHED)


def _interrupted(sweep: Sweep, parent: SweepRun, unfinished: list[str]) -> None:
    # A table over partly trained trials would mislead; the resumed sweep prints the complete one.
    parent.set_tags({"interrupted": "true"})
    parent.end(KILLED)
    where = f" --out {sweep.args.out}" + (f" --storage {sweep.args.storage}" if sweep.args.storage else "")
    print(f"\ninterrupted with {len(unfinished)} trial(s) unfinished ({', '.join(unfinished)}); continue with:\n"
          f"  python sweeps/run_{sweep.plan.kind}.py --resume {sweep.location.name}{where}", flush=True)
