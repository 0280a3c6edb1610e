"""The one runner behind every sweep CLI (run_ablation.py, run_search.py).

Order matters: everything a user can get wrong (arguments, arms file, search space, MLflow store, data) is
checked before Ray starts; then the cluster's storage and resources; only then are the parent run and Tune
started. What differs between an ablation and a search is a SweepKind (ablation.Ablation, search.Search).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import mlflow
import ray
from mlflow import MlflowClient
from ray import tune
from ray.tune import CLIReporter, ExperimentAnalysis

from dashboards.commands import ABLATION_REPORT_SCRIPT, REPO_ROOT, python_words, shell_join
from dashboards.shortcuts import ARTIFACT_FOLDER as SHORTCUT_FOLDER
from dashboards.shortcuts import write_shortcut_inputs
from dashboards.mlflow_store import (FAILED, FINISHED, KILLED, artifact_location, connect, credentials_hidden,
                                     mask_secrets, resolve_tracking_uri)
from search_spaces import OPTUNA_SPACE_FILE
from trainable.data.options import data_spec
from trainable.config import TrialConfig, parse_overrides
from trainable.data.cache import check_cache_space, check_png_files
from trainable.data.nih import PreparedData, prepare_dataset
from trainable.errors import ConfigError, exit_code_of
from trainable.runtime import default_cache_dir
from trainable.tune import ARM_KEY, TrialContext, resolve_config, run_trial

from .cache_warmup import trial_image_sizes, warm_node_caches
from .catalog import describe
from .checkpoint_retention import SMALL_BOOKKEEPING_ENV, CheckpointRetention, keep_latest_checkpoints
from .cluster import check_resources, check_shared_storage, start_ray
from .demo import demo_data
from .failures import NoRetryForDeterministic, bad_input_reason, is_bad_input, registry_name, start_registry
from .mlflow_logger import MLflowTrialLogger
from .options import EXECUTION_OPTIONS, LATEST, apply_defaults, build_parser
from .record import (RECORD_FILE, TUNER_FILE, SweepLocation, SweepRecord, check_name, default_name, latest_sweep,
                     storage_root, sweep_lock)
from .report import METRIC, MODE, SweepReport, unfinished_trials
from .tracking import SweepRun, git_commit, recorded_parent_run, ui_command
from .trial_description import TrialDescriber, tune_trial_dirname, tune_trial_name
from .tune_state import RECENT, check_restorable, check_unchanged, record_written

PROGRESS_METRICS = {"epoch": "epoch", "val_loss": "val loss", METRIC: "AUC", "val_f1_mean": "F1"}
PROGRESS_EVERY_S = 30
SAVE_PERIOD_ENV = "TUNE_GLOBAL_CHECKPOINT_S"   # how often Tune saves the experiment's state (default: 10 s or more)
TUNE_MIN_SAVE_PERIOD_S, FINAL_SAVE_PERIOD_S = 10.0, 2.0


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
    def tune_options(self, location: SweepLocation) -> dict[str, Any]: ...
    def context(self, data: PreparedData, cache_dir: str | None) -> TrialContext: ...
    def describer(self, context: TrialContext) -> TrialDescriber: ...
    def report(self, results: tune.ResultGrid, *, title: str, epochs: int, describer: TrialDescriber,
               report_command: str) -> SweepReport: ...


@dataclass
class PreparedSweep:
    """One sweep ready to run, as prepare() checked and built it: its arguments, plan, folder, MLflow store and data."""
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

    def body() -> int:
        if args.list:
            print(describe(getattr(args, "arms_file", None), getattr(args, "space_file", None) or OPTUNA_SPACE_FILE))
            return 0
        with contextlib.ExitStack() as held:     # the sweep's lock, for as long as this driver runs it
            return run(prepare(kind, args, parser, held))

    return exit_code_of(body, lambda: f"--out {args.out}" + (f" / --storage {args.storage}" if args.storage else ""))


# --- before Ray -----------------------------------------------------------------------------------------------

def prepare(kind: type, args: argparse.Namespace, parser: argparse.ArgumentParser,
            held: contextlib.ExitStack) -> PreparedSweep:
    """Every check that needs no cluster, then the data split (written into OUT/<name>/)."""
    out = Path(args.out)
    location, record = _locate(kind.kind, args, storage_root(args.storage, out), out, held)
    uri = resolve_tracking_uri(args.mlflow_uri, out)
    client = None
    if record is not None:   # before anything of the record is used: its files are the driver's own
        client = connect(uri)
        verify_resumable(client, uri, location, record)
        adopt_arguments(args, parser, record)
        print(f"resuming {kind.kind} {location.name!r} from {location.path}", flush=True)
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
    client = client or connect(uri)
    if args.overwrite and record is None:
        location.remove()
        shutil.rmtree(out / location.name, ignore_errors=True)
    data = prepare_dataset(data_spec(args), out / location.name)
    check_png_files(data.frame["path"])
    if record is not None and record.data.get("fingerprint") != data.fingerprint:
        raise ConfigError(f"--resume {location.name}: the data changed since the sweep started (fingerprint "
                          f"{data.fingerprint}, recorded {record.data.get('fingerprint')})")
    _check_cache_space(plan.context(data, args.cache_dir))
    return PreparedSweep(args=args, plan=plan, location=location, record=record, uri=uri, client=client, data=data)


def _locate(kind: str, args: argparse.Namespace, storage: str, out: Path, held: contextlib.ExitStack
            ) -> tuple[SweepLocation, SweepRecord | None]:
    """The sweep's folder, locked for this driver; on --resume also its record."""
    if not args.resume:
        location = SweepLocation(storage, check_name(args.name or default_name(kind)))
        held.enter_context(sweep_lock(location, out))
        if location.exists() and not args.overwrite:
            raise ConfigError(f"sweep {location.name!r} already exists in {storage}: --resume {location.name} "
                              f"continues it, --overwrite replaces it, --name picks another name")
        return location, None
    return locate_resumed(kind, args, storage, out, held)


def locate_resumed(kind: str, args: argparse.Namespace, storage: str, out: Path, held: contextlib.ExitStack
                   ) -> tuple[SweepLocation, SweepRecord]:
    """The folder (locked for this driver) and record of the run `--resume` names (or the latest of this kind).
    Nothing of the record is trusted yet: verify_resumable, then adopt_arguments."""
    name = latest_sweep(storage, kind) if args.resume == LATEST else args.resume
    if name is None:
        raise ConfigError(f"--resume: no {kind} sweep in {storage} to resume (give --out/--storage of the sweep)")
    location = SweepLocation(storage, check_name(name))
    held.enter_context(sweep_lock(location, out))
    record = location.read()
    if record is None or record.kind != kind or record.name != name:
        raise ConfigError(f"--resume {name}: no {kind} sweep recorded at {location.path}/sweep.json")
    if not tune.Tuner.can_restore(location.path):
        raise ConfigError(f"--resume {name}: {location.path} holds no Tune state (the sweep stopped before Tune "
                          f"started); start it again with --name {name} --overwrite")
    return location, record


def verify_resumable(client: MlflowClient, uri: str, location: SweepLocation, record: SweepRecord,
                     experiment: str | None = None) -> None:
    """Before anything of a resumed run's record is used: its parent run exists (in the MLflow experiment named
    after the run, or `experiment`) and its state files are the driver's own (tune_state)."""
    parent = recorded_parent_run(client, location.name, record.mlflow.get("experiment_id"),
                                 record.mlflow.get("parent_run_id"), uri, experiment)
    check_restorable(client, location, parent)


def adopt_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser, record: SweepRecord) -> None:
    """A resumed sweep's recorded arguments replace the command line's (only the resumable options may differ)."""
    for key, recorded in record.arguments.items():
        current = getattr(args, key, None)
        if current != parser.get_default(key) and current != recorded:
            raise ConfigError(f"--resume {record.name}: --{key.replace('_', '-')} {current!r} differs from the "
                              f"sweep's {recorded!r}; a resumed sweep keeps its arguments")
        setattr(args, key, recorded)


def _check_cache_space(context: TrialContext) -> None:
    """The decode-once caches of every image size the sweep's trials use must fit the cache folder's disk (checked
    on the driver's node; trials on other nodes meet a full disk as a one-line error of their own)."""
    sizes = {resolve_config({ARM_KEY: arm}, context).image_size for arm in context.arms} or \
        {TrialConfig.from_dict(context.base_config).image_size}
    check_cache_space(context.cache_dir or default_cache_dir(),
                      [(f"{context.data.fingerprint}-{split}", context.data.subset(split)["path"].tolist(), size)
                       for split in ("train", "val") for size in sorted(sizes)])


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

def run(sweep: PreparedSweep) -> int:
    for note in sweep.plan.notes:
        print(note)
    sizes = {name: size["images"] for name, size in sweep.data.split_sizes().items()}
    label = "SYNTHETIC data (generated, not NIH)" if sweep.data.synthetic else "NIH ChestX-ray14"
    print(f"{sweep.plan.kind} {sweep.location.name!r}: {label}, fingerprint {sweep.data.fingerprint}, "
          f"images per split {sizes}", flush=True)
    for note in sweep.data.notes():
        print(note, flush=True)
    context = sweep.plan.context(sweep.data, sweep.args.cache_dir)
    with cluster_session(sweep.args, sweep.location, context, getattr(sweep.plan, "space", None)):
        parent = _reopen_parent(sweep) if sweep.resumed else _start_parent(sweep)
        mlflow.set_tracking_uri(sweep.uri)   # read by the logger callback; never pickled into Tune's state
        return _fit(sweep, parent)


@contextlib.contextmanager
def cluster_session(args: argparse.Namespace, location: SweepLocation, context: TrialContext,
                    search_space: Any = None) -> Iterator[None]:
    """Ray joined (or started), checked for the run's storage and trial resources, every node's image cache built
    for the trials of `context`, and the run's no-retry registry held for as long as the block runs; Ray is shut
    down on the way out."""
    with credentials_hidden():   # a local Ray's workers inherit the driver's environment; trials need no MLflow
        start_ray(args.address)
    try:
        check_shared_storage(location.storage, storage_given=args.storage is not None)
        check_resources(args.cpus_per_trial, args.gpus_per_trial)
        registry = start_registry(location.name)  # noqa: F841 - held: the actor lives as long as this handle
        # every node's image cache before any trial: trials then only map it (and a bad PNG fails here, once)
        warm_node_caches(context.data, trial_image_sizes(context, search_space), args.cache_dir)
        yield
    finally:
        ray.shutdown()


def _start_parent(sweep: PreparedSweep) -> SweepRun:
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
    written = location.write(SweepRecord(
        kind=sweep.plan.kind, name=location.name, plan=sweep.plan.plan_record,
        arguments={key: value for key, value in vars(args).items() if key not in EXECUTION_OPTIONS},
        data={"fingerprint": data.fingerprint, "synthetic": data.synthetic, "sizes": data.split_sizes()},
        mlflow={"experiment_id": parent.experiment_id, "parent_run_id": parent.parent_run_id,
                "tracking_uri": mask_secrets(sweep.uri)}))
    record_written(sweep.client, parent.parent_run_id, {RECORD_FILE: written})
    if sweep.plan.kind == "ablation":
        _log_shortcut_inputs(sweep, parent)
    return parent


def _log_shortcut_inputs(sweep: PreparedSweep, parent: SweepRun) -> None:
    """Once per ablation, on its split, before any trial: the metadata-only model's validation predictions and
    the validation metadata the report's shortcut baselines and subgroup gaps read (dashboards/shortcuts.py)."""
    with tempfile.TemporaryDirectory(prefix="shortcut-baselines-") as folder:
        for path in write_shortcut_inputs(sweep.data, Path(folder)):
            sweep.client.log_artifact(parent.parent_run_id, str(path), artifact_path=SHORTCUT_FOLDER)


def _reopen_parent(sweep: PreparedSweep) -> SweepRun:
    return SweepRun.reopen(sweep.client, sweep.location.name, sweep.record.mlflow["experiment_id"],
                           sweep.record.mlflow["parent_run_id"], sweep.uri)


def _tuner(sweep: PreparedSweep, parent: SweepRun, context: TrialContext, describer: TrialDescriber) -> tune.Tuner:
    logger = MLflowTrialLogger(experiment_id=parent.experiment_id, parent_run_id=parent.parent_run_id,
                               describer=describer)
    return build_tuner(sweep.args, sweep.location, context, logger, sweep.client, resumed=sweep.resumed,
                       param_space=sweep.plan.param_space(), tune_options=sweep.plan.tune_options(sweep.location),
                       progress_parameters=sweep.plan.progress_parameters)


def build_tuner(args: argparse.Namespace, location: SweepLocation, context: TrialContext, logger: MLflowTrialLogger,
                client: MlflowClient, *, resumed: bool, param_space: dict[str, Any], tune_options: dict[str, Any],
                progress_parameters: list[str], keep_best: bool = False) -> tune.Tuner:
    """The Tuner of every run of trials (sweeps, final training): trainable.tune.run_trial with the run's
    resources, the MLflow logger, no-retry and checkpoint-retention callbacks, the progress table and retries.
    keep_best: each trial's best checkpoint by validation mean AUC is kept too (final training selects it)."""
    # tune.with_parameters sends the context (split table included) through the object store once
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
                                    {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
    # The new output engine ignores a passed-in progress reporter; the CLIReporter shows arm/seed and AUC/F1.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    os.environ.setdefault(SMALL_BOOKKEEPING_ENV, "1")     # Tune's saved state: a path per older checkpoint
    recent = RECENT
    if keep_best:
        # Final training: few trials, long epochs. Tune saves their state every few seconds instead of every 10 s
        # or more, so that a killed run resumes each member from its latest epoch; CheckpointRetention then counts
        # as many more saves, to keep the same time for an upload to reach the storage.
        os.environ.setdefault(SAVE_PERIOD_ENV, str(FINAL_SAVE_PERIOD_S))
        recent = RECENT * math.ceil(TUNE_MIN_SAVE_PERIOD_S / max(float(os.environ[SAVE_PERIOD_ENV]), 0.1))
    if resumed:   # Tune's saved state (verified before) has the rest, the MLflow logger included
        return tune.Tuner.restore(location.path, trainable=trainable, resume_errored=True)
    no_retry = NoRetryForDeterministic(location.name, args.max_failures)
    tuner = tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(**{"max_concurrent_trials": args.max_concurrent or None, **tune_options},
                                    reuse_actors=True, trial_name_creator=tune_trial_name,
                                    trial_dirname_creator=tune_trial_dirname),
        run_config=tune.RunConfig(
            name=location.name, storage_path=location.storage, verbose=1,
            # older checkpoints go by CheckpointRetention: CheckpointConfig(num_to_keep) races Tune's uploads
            callbacks=[logger, no_retry, CheckpointRetention(keep_best=keep_best, recent=recent)],
            progress_reporter=SweepProgress(parameter_columns=progress_parameters,
                                            metric_columns=PROGRESS_METRICS, max_report_frequency=PROGRESS_EVERY_S),
            failure_config=tune.FailureConfig(max_failures=args.max_failures),
            # a score attribute only ranks the checkpoints (Tune deletes none without num_to_keep)
            checkpoint_config=tune.CheckpointConfig(checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE)
            if keep_best else None))
    # Tune has just written tuner.pkl straight to the storage; the logger records the state it saves later
    record_written(client, logger.parent_run_id, {TUNER_FILE: location.read_bytes(TUNER_FILE)})
    return tuner


class SweepProgress(CLIReporter):
    """Tune's progress table without its `Result logdir:` line, which points into Ray's session folder: the
    sweep's files are where the driver prints at the end (`files:`)."""

    def _print(self, msg: str) -> None:
        super()._print("\n".join(line for line in msg.splitlines() if not line.startswith("Result logdir:")))


def _fit(sweep: PreparedSweep, parent: SweepRun) -> int:
    context = dataclasses.replace(sweep.plan.context(sweep.data, sweep.args.cache_dir),
                                  failure_registry=registry_name(sweep.location.name))
    describer = sweep.plan.describer(context)
    try:
        results = _tuner(sweep, parent, context, describer).fit()
    except BaseException as err:
        parent.set_tags({"error": f"{type(err).__name__}: {err}"[:500]})
        parent.end(KILLED if isinstance(err, KeyboardInterrupt) else FAILED)
        raise
    try:
        unfinished = settle(sweep.client, sweep.location, parent.parent_run_id)
    except ConfigError as err:
        parent.set_tags({"error": str(err)[:500]})
        parent.end(FAILED)
        raise
    if unfinished:
        _interrupted(sweep, parent, unfinished)
    else:
        _report(sweep, parent, results, describer)
    print(f"\nfiles: {sweep.location.path}\nMLflow experiment {sweep.location.name!r}; browse it with:\n  "
          f"{ui_command(sweep.uri)}", flush=True)
    return exit_code(results, unfinished)


def settle(client: MlflowClient, location: SweepLocation, parent_run_id: str, *, keep_best: bool = False
           ) -> list[str]:
    """After Tuner.fit: the names of the trials left unfinished, read back from the state on the storage (checked
    to be the driver's own first: it holds pickles), whose older checkpoints are then deleted (see
    keep_latest_checkpoints; keep_best as in build_tuner)."""
    check_unchanged(client, location, parent_run_id)
    saved = ExperimentAnalysis(location.path).trials    # fit() returned: its final save was waited for
    keep_latest_checkpoints(saved, keep_best=keep_best)
    return unfinished_trials(saved)


def exit_code(results: tune.ResultGrid, unfinished: list[str]) -> int:
    """0: every trial finished; 2: some trial failed on bad input (config, data, weights); 1: otherwise."""
    bad = [result for result in results if result.error is not None and is_bad_input(result.error)]
    if bad:
        first = bad_input_reason(bad[0].error)[:300]
        print(f"error: {len(bad)} trial(s) failed on bad input, each once (not retried); first: {first}",
              file=sys.stderr, flush=True)
        return 2
    return 1 if unfinished or results.num_errors else 0


def _report(sweep: PreparedSweep, parent: SweepRun, results: tune.ResultGrid, describer: TrialDescriber) -> None:
    synthetic = " — SYNTHETIC data (generated, not NIH)" if sweep.data.synthetic else ""
    title = f"{sweep.plan.kind} {sweep.location.name!r}{synthetic} — data {sweep.data.fingerprint}"
    report_command = shell_join([*python_words(ABLATION_REPORT_SCRIPT), "--sweep", sweep.location.name,
                                 "--mlflow-uri", mask_secrets(sweep.uri)])
    report = sweep.plan.report(results, title=title, epochs=sweep.args.epochs, describer=describer,
                               report_command=report_command)
    print("\n" + report.text, flush=True)
    for file_name, text in {**report.files, f"{sweep.plan.kind}_summary.txt": report.text + "\n"}.items():
        sweep.location.write_text(file_name, text)
        parent.log_text(text, file_name)
    parent.set_tags({**report.tags, "interrupted": "false"})
    parent.end(FINISHED)


def _interrupted(sweep: PreparedSweep, parent: SweepRun, unfinished: list[str]) -> None:
    # A table over partly trained trials would mislead; the resumed sweep prints the complete one.
    parent.set_tags({"interrupted": "true"})
    parent.end(KILLED)
    where = ["--out", sweep.args.out, *(["--storage", sweep.args.storage] if sweep.args.storage else [])]
    resume = shell_join([*python_words(f"sweeps/run_{sweep.plan.kind}.py"), "--resume", sweep.location.name, *where])
    print(f"\ninterrupted with {len(unfinished)} trial(s) unfinished ({', '.join(unfinished)}); continue with:\n"
          f"  {resume}", flush=True)
