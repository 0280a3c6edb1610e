"""`python sweeps/train_best.py`: retrain the best config(s) with a longer budget and evaluate on the test split.

Order: arguments, configs (choose.py), MLflow store and data are checked first; then the members train as Ray Tune
trials on the cluster (fit.py; each keeps its epoch with the best validation mean AUC, members.py), thresholds are
chosen on validation, the test split is predicted once, and only then are its labels read for the report
(predict.py keeps that order structural; dashboards/final_report.py writes it). A killed run continues with
`--resume`, as a sweep does.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

from dashboards.commands import REPO_ROOT, python_words, shell_join
from dashboards.evidence import CONFIG_FILE, EVIDENCE_TAG, config_evidence
from dashboards.mlflow_store import (FAILED, FINISHED, KILLED, artifact_location, connect, mask_secrets,
                                     resolve_tracking_uri)
from trainable.data.options import DATA_OPTIONS, add_data_arguments, data_spec
from trainable.config import parse_overrides
from trainable.data.external import DEFAULT_UNCERTAIN, LAYOUTS, UNCERTAIN_POLICIES, load_externals
from trainable.data.nih import PreparedData, prepare_dataset, write_text_atomically
from trainable.errors import ConfigError, UserError, exit_code_of
from trainable.findings import FINDINGS
from trainable.tune import TrialContext

from ..options import RESUMABLE_OPTIONS, add_cluster_arguments, add_storage_arguments, positive_int
from ..record import RECORD_FILE, SweepLocation, SweepRecord, check_name, storage_root, sweep_lock
from ..runner import (absolute_local_paths, adopt_arguments, cluster_session, exit_code, locate_resumed, settle,
                      verify_resumable)
from ..tracking import git_commit, ui_command
from ..trial_description import trial_run_name
from ..tune_state import record_written
from . import fit, predict
from .choose import Candidate, from_config_file, sweep_candidates, sweep_data_arguments
from .members import MemberSpec, TrainedMember, member_specs
from .predict import FinalModel, blind_test_labels, final_model
from .track import FinalRun, global_tracking_uri

DESCRIPTION = """Final training: the best config of a sweep (or a config file) trained with a longer budget over
one or more seeds, epochs selected and F1 thresholds chosen on validation only, then evaluated once on the test split:
per-finding AUC with bootstrap CIs, F1, sensitivity, specificity, PPV, NPV, calibration (ECE), ROC curves,
Grad-CAM overlays, a comparison with published AUCs, and the model registered in MLflow.

    python sweeps/train_best.py --from-sweep srch --epochs 20 --seeds 3          # data as the sweep recorded it
    python sweeps/train_best.py --config runs/srch/best_config.json --data /data/nih --epochs 20
    python sweeps/train_best.py --from-sweep abl --ensemble 3                      # average the top-3 configs
    python sweeps/train_best.py --from-sweep abl --seeds 3 --address auto --storage /nfs/final --gpus-per-trial 1
    python sweeps/train_best.py --resume --storage /nfs/final                     # continue a killed run
"""
DEFAULT_EXPERIMENT = "final-training"
DEFAULT_MODEL_NAME = "cxr-classifier"
KIND = "final"                   # the kind in sweep.json: what `--resume` looks for
# What a resumed final training may change (where it runs and logs); the rest is the recorded run's.
NOT_RECORDED = (*RESUMABLE_OPTIONS, "storage", "resume", "overwrite")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python sweeps/train_best.py", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("configs (one is required, except with --resume)"
                                       ).add_mutually_exclusive_group()
    source.add_argument("--from-sweep", metavar="SWEEP",
                        help="a sweep's parent run id or MLflow experiment name: its configs ranked by validation "
                             "mean AUC (seeds of one config averaged)")
    source.add_argument("--config", metavar="JSON", help="a config file, e.g. the best_config.json of run_search")
    final = parser.add_argument_group("final training")
    final.add_argument("--epochs", type=positive_int, default=None,
                       help="epoch budget of every member (default: the config's own)")
    final.add_argument("--seeds", type=positive_int, default=1,
                       help="seeds per config: config.seed, +1, ...; their predictions are averaged (default: 1)")
    final.add_argument("--ensemble", type=positive_int, default=1,
                       help="average the top-K configs of --from-sweep, ranked on validation (default: 1)")
    final.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key of every member, repeatable (e.g. --set batch_size=64)")
    final.add_argument("--out", default=None,
                       help="output folder (default: runs/final-<timestamp>); must be new or empty")
    final.add_argument("--overwrite", action="store_true",
                       help="replace what a non-empty --out (or its Tune folder in --storage) holds")
    add_storage_arguments(final, storage_default="the folder holding --out; the members' Tune folder is named "
                                                  "after --out", what="final training (NAME: its --out folder's name)")
    report = parser.add_argument_group("evaluation")
    report.add_argument("--bootstrap", type=positive_int, default=1000,
                        help="bootstrap resamples of the test images for AUC CIs (default: %(default)s)")
    report.add_argument("--gradcam-samples", type=int, default=2,
                        help="Grad-CAM overlays per finding, on positive test images (default: %(default)s)")
    report.add_argument("--bbox-csv", default=None,
                        help="NIH's BBox_List_2017.csv for the localization score (default: looked for in --data)")
    report.add_argument("--google-labels", action="append", default=None, metavar="CSV",
                        help="Google's 2019 expert labels, repeatable (default: looked for in --data)")
    report.add_argument("--external", action="append", default=[], metavar="NAME=DIR",
                        help=f"also evaluate on an external test set, repeatable; NAME one of {', '.join(LAYOUTS)} "
                             f"(frontal images, the findings it shares with NIH)")
    report.add_argument("--uncertain", choices=list(UNCERTAIN_POLICIES), default=DEFAULT_UNCERTAIN,
                        help="CheXpert/MIMIC uncertain (-1) labels: counted as 0, as 1, or left out of the "
                             "finding's metrics (default: %(default)s)")
    tracking = parser.add_argument_group("MLflow")
    tracking.add_argument("--mlflow-uri", default=None,
                          help="tracking store to read the sweep from and log to (default: $MLFLOW_TRACKING_URI, "
                               "else mlflow.db beside --out: runs/mlflow.db, where the sweeps log by default)")
    tracking.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                          help="MLflow experiment of the final run (default: %(default)s)")
    tracking.add_argument("--registered-model", default=DEFAULT_MODEL_NAME,
                          help="MLflow registered model name (default: %(default)s)")
    parser.add_argument("--data", default=None,
                        help="NIH ChestX-ray14 folder (default with --from-sweep: the sweep's data and split "
                             "options, as recorded on its parent run; options given here override them)")
    add_data_arguments(parser)
    add_cluster_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        with contextlib.ExitStack() as held:     # the run's lock, for as long as this driver runs it
            return run(args, parser, held)

    return exit_code_of(body, lambda: f"--out {args.out or 'runs'}")


# --- before training --------------------------------------------------------------------------------------------

def _locate(args: argparse.Namespace, parser: argparse.ArgumentParser, held: contextlib.ExitStack
            ) -> tuple[Path, SweepLocation, SweepRecord | None, str]:
    """(the output folder, the members' Tune folder `<storage>/<out's name>`, locked for this driver, the record
    when resuming, the MLflow tracking URI)."""
    storage = storage_root(args.storage, Path(args.out).parent if args.out else Path("runs"))
    if args.resume:
        location, record = locate_resumed(KIND, args, storage, Path(args.out or "runs"), held)
        out = Path(args.out or record.arguments.get("out") or location.name)
        uri = resolve_tracking_uri(args.mlflow_uri, out.parent)
        verify_resumable(connect(uri), uri, location, record,   # before anything of the record is used
                         record.arguments.get("experiment", DEFAULT_EXPERIMENT))
        adopt_arguments(args, parser, record)                   # restores --out and the rest
        print(f"resuming {KIND} {location.name!r} from {location.path}", flush=True)
        return Path(args.out), location, record, uri
    if not (args.config or args.from_sweep):
        raise ConfigError("one of --from-sweep or --config is required (or --resume to continue a final training)")
    out = Path(args.out or Path("runs") / f"final-{time.strftime('%Y%m%d-%H%M%S')}")
    location = SweepLocation(storage, check_name(out.name))
    held.enter_context(sweep_lock(location, out))
    if ((out.exists() and any(out.iterdir())) or location.exists()) and not args.overwrite:
        raise UserError(f"--out {out} is not empty (or its Tune folder {location.path} exists); pass --overwrite to "
                        f"replace it, --resume {out.name} to continue it, or another --out")
    args.out = str(out)
    return out, location, None, resolve_tracking_uri(args.mlflow_uri, out.parent)


def _candidates(args: argparse.Namespace, parser: argparse.ArgumentParser, uri: str
                ) -> tuple[list[Candidate], str, dict[str, str]]:
    """(configs to train, where they come from, tags naming the source); fills the data options from a sweep."""
    if args.config:
        if args.ensemble > 1:
            raise ConfigError("--ensemble needs --from-sweep: a config file holds one config")
        if args.data is None:
            raise ConfigError("--data is required with --config: the NIH ChestX-ray14 folder")
        return [from_config_file(args.config)], f"config file {args.config} (evidence: {CONFIG_FILE})", \
            {"source_config": str(args.config), EVIDENCE_TAG: CONFIG_FILE}
    client = connect(uri, create=False)
    sweep, candidates = sweep_candidates(client, args.from_sweep, args.ensemble)
    if args.data is None:
        _fill_data_options(args, parser, sweep_data_arguments(sweep))
    evidence = config_evidence(client, sweep, [c.label for c in candidates])
    ranked = ", ".join(f"{c.label} (val AUC {c.val_auc_mean:.3f}, {c.trials} trial(s); evidence: {why})"
                       for c, why in zip(candidates, evidence))
    source = f"sweep {sweep.name!r} (parent run {sweep.parent_run_id}), top {len(candidates)} by validation " \
             f"mean AUC: {ranked}"
    tags = {"source_sweep": sweep.name, "source_sweep_run": sweep.parent_run_id,
            "source_data_fingerprint": sweep.parent_params.get("data_fingerprint", ""),
            EVIDENCE_TAG: "; ".join(evidence)[:5000]}
    return candidates, source, tags


def _fill_data_options(args: argparse.Namespace, parser: argparse.ArgumentParser, recorded: list[str]) -> None:
    """The sweep's data options, except where this command line set one away from its default."""
    data_parser = argparse.ArgumentParser(add_help=False)
    data_parser.add_argument("--data")
    add_data_arguments(data_parser)
    sweep_args = data_parser.parse_args(recorded)
    for key, value in vars(sweep_args).items():
        if key != "cache_dir" and getattr(args, key) == parser.get_default(key):
            setattr(args, key, value)


def _apply_overrides(candidates: list[Candidate], args: argparse.Namespace) -> list[tuple[str, object]]:
    overrides = parse_overrides(args.set)
    if "seed" in overrides and args.seeds > 1:
        raise ConfigError("--set seed with --seeds > 1: members use seeds config.seed, +1, ...; set one or the other")
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    overrides = absolute_local_paths(overrides)
    return [(c.label, c.config.replace(**overrides)) for c in candidates]


# --- the run ----------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace, parser: argparse.ArgumentParser, held: contextlib.ExitStack) -> int:
    from dashboards.annotations import BBOX_FILE, GOOGLE_FILES, find_files

    out, location, record, uri = _locate(args, parser, held)
    candidates, source, source_tags = _candidates(args, parser, uri)
    # Members train in their own folders, maybe on other nodes: only absolute paths travel.
    args.data = str(Path(args.data).expanduser().resolve())
    args.cache_dir = str(Path(args.cache_dir).expanduser().resolve()) if args.cache_dir else None
    specs = member_specs(_apply_overrides(candidates, args), args.seeds)
    plan = {spec.name: spec.config.to_dict() for spec in specs}
    if record is not None and record.plan != plan:
        raise ConfigError(f"--resume {location.name}: the members' configs changed since it started (see plan in "
                          f"{location.path}/sweep.json); resume with the same sources")
    if args.gradcam_samples < 0:
        raise ConfigError(f"--gradcam-samples {args.gradcam_samples}: expected 0 or more")
    bbox_csv = Path(args.bbox_csv) if args.bbox_csv else next(iter(find_files(args.data, [BBOX_FILE])), None)
    google_files = [Path(p) for p in args.google_labels] if args.google_labels else find_files(args.data, GOOGLE_FILES)
    for path in [bbox_csv, *google_files]:
        if path is not None and not path.is_file():
            raise ConfigError(f"{path}: no such file")
    externals = load_externals(args.external, uncertain=args.uncertain, skip_missing=args.skip_missing)
    client = connect(uri)
    if args.overwrite and record is None:
        location.remove()
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_dataset(data_spec(args), out)
    if record is not None and record.data.get("fingerprint") != data.fingerprint:
        raise ConfigError(f"--resume {location.name}: the data changed since it started (fingerprint "
                          f"{data.fingerprint}, recorded {record.data.get('fingerprint')})")
    _print_header(data, source, specs, bbox_csv, google_files)
    recorded = source_tags.get("source_data_fingerprint")
    if recorded and recorded != data.fingerprint:
        print(f"note: the data (fingerprint {data.fingerprint}) differ from those the sweep chose its configs on "
              f"({recorded})", flush=True)

    # The driver's MLflow logger (a Tune callback) writes through the global tracking URI, as in the sweeps.
    blinded = blind_test_labels(data)
    context = fit.member_context(specs, blinded, location, args.cache_dir)
    with cluster_session(args, location, context), global_tracking_uri(uri):
        if record is None:
            tracker = FinalRun.start(client, uri, experiment=args.experiment, run_name=out.name,
                                     artifact_root=artifact_location(uri, out.parent),
                                     params=_run_params(args, specs, data, location),
                                     tags=_run_tags(data, source, source_tags, location))
            written = location.write(SweepRecord(
                kind=KIND, name=location.name, plan=plan,
                arguments={key: value for key, value in vars(args).items() if key not in NOT_RECORDED},
                data={"fingerprint": data.fingerprint, "synthetic": data.synthetic, "sizes": data.split_sizes()},
                mlflow={"experiment_id": tracker.experiment_id, "parent_run_id": tracker.parent_run_id,
                        "tracking_uri": mask_secrets(uri)}))
            record_written(client, tracker.parent_run_id, {RECORD_FILE: written})
        else:
            tracker = FinalRun.reopen(client, uri, name=location.name, experiment=args.experiment,
                                      experiment_id=record.mlflow["experiment_id"],
                                      parent_run_id=record.mlflow["parent_run_id"])
        try:
            final = _train_on_cluster(args, location, specs, blinded, context, client, tracker,
                                      resumed=record is not None)
        except BaseException as err:
            tracker.end(KILLED if isinstance(err, KeyboardInterrupt) else FAILED)
            raise
    if isinstance(final, int):
        return final
    try:
        _finish(args, out, data, final, source, tracker, bbox_csv, google_files, externals)
    except BaseException as err:
        tracker.end(KILLED if isinstance(err, KeyboardInterrupt) else FAILED)
        raise
    tracker.end(FINISHED)
    print(f"\nfiles: {out}\nMLflow run {tracker.parent_run_id} in experiment {args.experiment!r}; browse with:\n"
          f"  {ui_command(uri)}", flush=True)
    return 0


def _train_on_cluster(args: argparse.Namespace, location: SweepLocation, specs: list[MemberSpec],
                      blinded: PreparedData, context: TrialContext, client: MlflowClient, tracker: FinalRun, *,
                      resumed: bool) -> FinalModel | int:
    """The members as Tune trials on blinded data, each one's selected epoch, the test split predicted on the
    cluster; an exit code instead when a member failed or the run was interrupted."""
    results = fit.tuner(args, location, specs, context, client, experiment_id=tracker.experiment_id,
                        parent_run_id=tracker.parent_run_id, resumed=resumed).fit()
    unfinished = settle(client, location, tracker.parent_run_id, keep_best=True)
    if unfinished or results.num_errors:
        failed = [trial_run_name(r.config, "") for r in results if r.error is not None]
        what = (f"interrupted with {len(unfinished)} member(s) unfinished ({', '.join(unfinished)})" if unfinished
                else f"{len(failed)} member(s) failed ({', '.join(failed)}): the final model needs every member; "
                     f"fix the cause (see their FAILED runs in MLflow)")
        tracker.set_tags({"interrupted": str(bool(unfinished)).lower()})
        tracker.end(KILLED if unfinished else FAILED)
        where = ["--out", args.out, *(["--storage", args.storage] if args.storage else [])]
        resume = shell_join([*python_words("sweeps/train_best.py"), "--resume", location.name, *where])
        print(f"\n{what}; continue with:\n  {resume}", flush=True)
        return exit_code(results, unfinished)
    order = {spec.name: index for index, spec in enumerate(specs)}
    members = sorted((fit.member_of(result, specs) for result in results), key=lambda m: order[m.spec.name])
    tracker.find_members()
    for member in members:
        _on_member(tracker, member)
    return final_model(members, blinded, predict.predict_test(members, blinded, args))


def _on_member(tracker: FinalRun, member: TrainedMember) -> None:
    tracker.finish_member(member.spec.name, selected_epoch=member.selected_epoch, selected_value=member.selected_value)
    print(f"{member.spec.name}: selected epoch {member.selected_epoch} (best validation mean AUC "
          f"{member.selected_value:.4f})", flush=True)


def _print_header(data: PreparedData, source: str, specs: list[MemberSpec], bbox_csv, google_files) -> None:
    label = "SYNTHETIC data (generated, not NIH)" if data.synthetic else "NIH ChestX-ray14"
    sizes = {name: size["images"] for name, size in data.split_sizes().items()}
    print(f"final training: {label}, fingerprint {data.fingerprint}, split sizes {sizes} images", flush=True)
    for note in data.notes():
        print(note, flush=True)
    print(f"configs from {source}", flush=True)
    print(f"members: {', '.join(s.name for s in specs)} ({specs[0].config.epochs} epochs each)", flush=True)
    print(f"localization boxes: {bbox_csv or 'none found'}; Google 2019 labels: "
          f"{', '.join(map(str, google_files)) or 'none found'}", flush=True)


def _run_params(args: argparse.Namespace, specs: list[MemberSpec], data: PreparedData, location: SweepLocation
                ) -> dict:
    sizes = {f"split_{name}_{unit}": count for name, size in data.split_sizes().items() for unit, count in size.items()}
    options = {key: getattr(args, key) for key in ("from_sweep", "config", "seeds", "ensemble", "data", *DATA_OPTIONS,
                                                   "bootstrap", "cpus_per_trial", "gpus_per_trial", "max_concurrent",
                                                   "max_failures")}
    # The best config as flat params, like a sweep's child run (members' own configs are on their child runs).
    return {**specs[0].config.to_dict(), **{k: v for k, v in options.items() if v is not None}, **sizes,
            "members": ",".join(s.name for s in specs), "data_fingerprint": data.fingerprint,
            "tune_path": location.path}


def _run_tags(data: PreparedData, source: str, source_tags: dict[str, str], location: SweepLocation) -> dict:
    return {"kind": KIND, "data": "SYNTHETIC" if data.synthetic else "NIH", "synthetic_data": data.synthetic,
            "data_fingerprint": data.fingerprint, "git_commit": git_commit(REPO_ROOT), "source": source[:5000],
            "tune_path": mask_secrets(location.path), **source_tags}


def _finish(args, out: Path, data: PreparedData, final: FinalModel, source: str, tracker: FinalRun,
            bbox_csv, google_files, externals=()) -> None:
    from dashboards.final_report import ReportContext, summary_text, write_report

    members = final.members
    thresholds = dict(zip(FINDINGS, map(float, final.validation.thresholds)))
    config_file, thresholds_file = out / "config.json", out / "thresholds.json"
    write_text_atomically(config_file, members[0].spec.config.to_json() + "\n")
    write_text_atomically(thresholds_file, json.dumps(thresholds, indent=2) + "\n")
    write_text_atomically(out / "members.json", json.dumps(
        [{"member": m.spec.name, "config_label": m.spec.label, "selected_epoch": m.selected_epoch,
          "selected_val_auc_mean": m.selected_value, "config": m.spec.config.to_dict()} for m in members],
        indent=2) + "\n")
    model = final.deployable()
    context = ReportContext(source=source, member_names=[m.spec.name for m in members],
                            member_labels=[m.spec.label for m in members],
                            member_seeds=[m.spec.config.seed for m in members],
                            selected_epochs=[m.selected_epoch for m in members],
                            selected_values=[m.selected_value for m in members], cache_dir=args.cache_dir,
                            n_boot=args.bootstrap, gradcam_per_finding=args.gradcam_samples, bbox_csv=bbox_csv,
                            google_files=list(google_files), externals=list(externals))
    report = write_report(out, data, model, context, image_config=members[0].spec.config,
                          val_images=final.validation.images, val_labels=final.validation.labels,
                          val_probs=final.validation.probs, thresholds=final.validation.thresholds,
                          test_images=final.test_images, test_probs_by_member=final.test_probs_by_member)
    print("\n" + summary_text(report, data.synthetic), flush=True)
    tracker.log_test_metrics(report.test_metrics, report.members)
    tracker.log_external_metrics(report.external)
    tracker.log_files(out)
    mean_auc = float(report.test_metrics["auc"].mean())
    synthetic = " SYNTHETIC data (not NIH)." if data.synthetic else ""
    version = tracker.log_model(
        model, args.registered_model, config=members[0].spec.config, config_file=config_file,
        thresholds_file=thresholds_file, thresholds=thresholds,
        description=f"Final model from {source}. Test mean AUC {mean_auc:.3f}; thresholds chosen on validation."
                    f"{synthetic}")
    print(f"\nregistered model {args.registered_model!r} version {version} (mlflow.pytorch; input uint8 images, "
          f"output probabilities of {len(FINDINGS)} findings)", flush=True)
