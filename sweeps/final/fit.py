"""Final training's members fitted as Ray Tune trials: the sweeps' trainable, Tuner, MLflow logger and no-retry
callback (sweeps/runner.py), one trial per member (config x seed), checkpointed every epoch, resumable like a sweep.

Two checkpoints of each member are kept (sweeps/checkpoint_retention.py, keep_best): the latest (what a retry or
`--resume` continues from) and the best by validation mean AUC, ranked as members.selection_key ranks epochs, so
it is the epoch members.select_epoch selects from the member's full history. `fit_final` fits the same members in
this process, one after another, without Ray.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Sequence

from mlflow import MlflowClient
from ray import tune
from ray.tune.search.basic_variant import BasicVariantGenerator

from trainable.data.nih import PreparedData
from trainable.evaluate import predict
from trainable.tune import ARM_KEY, TrialContext

from ..failures import registry_name
from ..mlflow_logger import STEP_KEY, MLflowTrialLogger, trial_metrics
from ..record import SweepLocation
from ..runner import build_tuner
from ..trial_description import TrialDescriber, trial_run_name
from .members import EpochCallback, MemberSpec, TrainedMember, read_checkpoint, select_epoch, train_member
from .predict import FinalModel, blind_test_labels, final_model

MEMBER_KIND = "final-member"          # the `kind` tag of a member's MLflow run


def member_context(specs: Sequence[MemberSpec], blinded: PreparedData, location: SweepLocation,
                   cache_dir: str | None) -> TrialContext:
    """Each config label is an arm (its full config); a trial is an arm at a seed. The data are the blinded ones:
    no trial sees a test label."""
    arms = {spec.label: spec.config.to_dict() for spec in specs}
    return TrialContext(data=blinded, base_config={}, arms=arms, cache_dir=cache_dir,
                        failure_registry=registry_name(location.name))


def tuner(args: argparse.Namespace, location: SweepLocation, specs: Sequence[MemberSpec], context: TrialContext,
          client: MlflowClient, *, experiment_id: str, parent_run_id: str, resumed: bool) -> tune.Tuner:
    # Exactly the members (a grid over arms x seeds would pair every config with every seed): each point replaces
    # one of num_samples draws of the space. Tune ignores max_concurrent_trials beside a search algorithm given
    # as an instance, so the generator limits concurrency itself.
    points = [{ARM_KEY: spec.label, "seed": spec.config.seed} for spec in specs]
    space = {ARM_KEY: tune.choice(sorted({p[ARM_KEY] for p in points})),
             "seed": tune.choice(sorted({p["seed"] for p in points}))}
    search = BasicVariantGenerator(points_to_evaluate=points, max_concurrent=args.max_concurrent)
    logger = MLflowTrialLogger(experiment_id=experiment_id, parent_run_id=parent_run_id,
                               describer=TrialDescriber.for_sweep(MEMBER_KIND, context), tune_name=location.name)
    return build_tuner(args, location, context, logger, client, resumed=resumed, param_space=space,
                       tune_options={"search_alg": search, "num_samples": len(points), "max_concurrent_trials": None},
                       progress_parameters=[ARM_KEY, "seed"], keep_best=True)


def member_of(result: tune.Result, specs: Sequence[MemberSpec]) -> TrainedMember:
    """A finished trial as the member it trained: its selected epoch's weights and validation predictions."""
    spec = next(s for s in specs if s.name == trial_run_name(result.config or {}, ""))
    # progress.csv may repeat an epoch a resumed trial ran again (deterministically): the last one counts.
    by_epoch = {int(row[STEP_KEY]): {**trial_metrics(row), STEP_KEY: int(row[STEP_KEY])}
                for row in result.metrics_dataframe.to_dict("records")}
    history = [by_epoch[epoch] for epoch in sorted(by_epoch)]
    epoch = select_epoch(history)
    # Tune numbers a trial's checkpoints from 0 and every epoch reports one (a restored trial continues the count);
    # named by folder, not by the metrics Tune keeps with it (which TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE cuts).
    # Tune ranks them by validation mean AUC (ascending), the best last: the one CheckpointRetention kept.
    ranked = [checkpoint for checkpoint, _ in result.best_checkpoints]
    wanted, best = f"checkpoint_{epoch - 1:06d}", Path(ranked[-1].path).name if ranked else None
    if best != wanted:
        raise RuntimeError(f"member {spec.name}: the checkpoint kept as its best is {best}, not {wanted} of the "
                           f"selected epoch {epoch}")
    with ranked[-1].as_directory() as folder:
        return read_checkpoint(spec, by_epoch[epoch], Path(folder), history)


def fit_final(specs: Sequence[MemberSpec], data: PreparedData, *, cache_dir: str | Path | None = None,
              on_epoch: EpochCallback | None = None,
              on_member: Callable[[TrainedMember], None] | None = None) -> FinalModel:
    """Train every member here, one after another (`tuner` trains them as Ray Tune trials), decide on
    validation, then predict the test split (without its labels)."""
    blinded = blind_test_labels(data)
    members = []
    for spec in specs:
        member = train_member(spec, blinded, cache_dir=cache_dir, on_epoch=on_epoch)
        if on_member is not None:
            on_member(member)
        members.append(member)
    test_probs = [predict(m.spec.config, m.state_dict, blinded, "test", cache_dir) for m in members]
    return final_model(members, blinded, test_probs)
