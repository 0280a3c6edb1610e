"""Which of a trial's checkpoints a sweep keeps: its latest, and any that a recently saved experiment state names.

Tune restores a trial from the checkpoint its saved experiment state names. Tune writes that state to a staging
folder on the driver's disk and uploads it to the storage in the background, so the storage's copy is a save or
two behind. Tune's own `CheckpointConfig(num_to_keep=K)` deletes a trial's oldest checkpoint the moment the trial
reports a new one. For any K, that deleted checkpoint can be the one the storage's state still names: Tune forces
a save once a trial has reported K checkpoints since the last save, and the K-th report deletes the checkpoint
that last save named. If the driver was killed before the forced save reached the storage, `--resume` found a
state that named a deleted checkpoint, and that trial could not be restored (benchmarks/chaos.py ran into this).

CheckpointRetention deletes a checkpoint only when none of the last RECENT saves names it. The storage's state
then names only checkpoints that exist, as long as each upload ends within RECENT - 1 save periods. Tune saves
at most every 10 s while a sweep runs (TUNE_GLOBAL_CHECKPOINT_S), and warns when an upload takes over 30 s.
Once a run's final state is on the storage, keep_latest_checkpoints deletes all but the checkpoint it names.

With keep_best (final training, whose members' epochs are selected after they finish), each trial's best
checkpoint is kept too, by both: the one Tune's checkpoint bookkeeping ranks first when the run's
CheckpointConfig names a checkpoint_score_attribute (validation mean AUC, ranked as final.selection_key ranks
epochs). Under TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE that bookkeeping keeps exactly the score of each
checkpoint, so the ranking survives a resume; without num_to_keep Tune itself deletes nothing. Final training
has Tune save every 2 s (sweeps/runner.py build_tuner) and counts `recent` saves in proportion, so an upload has
as long to reach the storage as in a sweep.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any, Iterable

import pyarrow.fs
from ray.tune import Callback, Checkpoint
from ray.tune.experiment import Trial

from .tune_state import RECENT

logger = logging.getLogger(__name__)
# Tune's checkpoint bookkeeping (pickled into every save) keeps one entry per checkpoint ever reported once
# num_to_keep is unset; this keeps those entries to a path each (the latest keeps its metrics for restoring)
SMALL_BOOKKEEPING_ENV = "TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE"


def best_checkpoint(trial: Trial) -> Checkpoint | None:
    """The trial's checkpoint that Tune's bookkeeping ranks best by the run's checkpoint_score_attribute."""
    best = trial.run_metadata.checkpoint_manager.best_checkpoint_result
    return best.checkpoint if best is not None else None


def _kept(trial: Trial, keep_best: bool) -> set[str]:
    """Paths of the trial's checkpoints never to delete: its latest, and with keep_best its best."""
    kept = {trial.checkpoint} | ({best_checkpoint(trial)} if keep_best else set())
    return {checkpoint.path for checkpoint in kept if checkpoint is not None}


class CheckpointRetention(Callback):
    """Per trial, keeps the latest checkpoint (with keep_best also its best) and those the last RECENT saved
    states name; deletes the rest."""

    def __init__(self, keep_best: bool = False, recent: int = RECENT) -> None:
        self.keep_best = keep_best
        self.recent = recent                                      # saves: more where Tune saves more often
        self._trials: list[Trial] = []                            # Tune's own list of the experiment's trials
        self._reported: dict[str, Checkpoint] = {}                # path -> checkpoint reported in this session
        self._saves: deque[set[str]] = deque(maxlen=recent)       # checkpoint paths each recent save names

    def __getstate__(self) -> dict:
        # pickled into tuner.pkl: the option only, nothing of one driver session
        return {"keep_best": self.keep_best, "recent": self.recent}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def on_checkpoint(self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: Checkpoint,
                      **info: Any) -> None:
        self._trials = trials
        self._reported[checkpoint.path] = checkpoint

    def get_state(self) -> None:
        """Called while Tune saves the experiment, after it has written the state that names each trial's latest
        checkpoint to its staging folder, before that state is uploaded. Returns no state of its own (so Tune
        writes no callback-state file)."""
        self._saves.append(set().union(*(_kept(trial, self.keep_best) for trial in self._trials)))
        named = set().union(*self._saves)
        for path in [path for path in self._reported if path not in named]:
            checkpoint = self._reported.pop(path)
            _delete(checkpoint.filesystem, path)
        return None


def keep_latest_checkpoints(trials: Iterable[Trial], *, keep_best: bool = False) -> None:
    """For trials as read back from the state on the storage after a run (its final save waited for): deletes
    every checkpoint folder of each trial but the one that state names (with keep_best, and its best). Older ones
    that CheckpointRetention still kept, or that an earlier, killed driver left, are not needed to resume or for
    the MLflow artifacts."""
    for trial in trials:
        latest, kept = trial.checkpoint, _kept(trial, keep_best)
        if latest is None:
            continue
        selector = pyarrow.fs.FileSelector(trial.storage.trial_fs_path, allow_not_found=True)
        for info in latest.filesystem.get_file_info(selector):
            if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_") \
                    and info.path not in kept:
                _delete(latest.filesystem, info.path)


def _delete(filesystem: pyarrow.fs.FileSystem, path: str) -> None:
    try:
        filesystem.delete_dir(path)
    except OSError as err:        # as in Tune's own deletion: a checkpoint left behind never stops a sweep
        logger.warning("could not delete the older checkpoint %s: %s", path, err)
