"""CheckpointRetention on real checkpoint folders: a checkpoint that one of the last RECENT saved experiment states
names is never deleted (the storage's copy of the state may lag that far behind), older ones are.

The callback reads nothing of a trial but its latest checkpoint (with keep_best also Tune's own checkpoint
bookkeeping, used here as Tune uses it), so a namespace with those attributes stands in for Tune's Trial; the
end-to-end sweeps (tests/test_sweeps.py) and final training (tests/test_train_best.py) run it inside Tune."""
from __future__ import annotations

import pickle
from types import SimpleNamespace

from ray.train._internal.checkpoint_manager import _CheckpointManager
from ray.train._internal.session import _TrainingResult
from ray.tune import Checkpoint, CheckpointConfig

from sweeps.checkpoint_retention import SMALL_BOOKKEEPING_ENV, CheckpointRetention, keep_latest_checkpoints
from sweeps.report import METRIC, MODE
from sweeps.tune_state import RECENT


def test_a_checkpoint_is_deleted_only_once_no_recent_save_names_it(tmp_path):
    retention, trial, others = CheckpointRetention(), SimpleNamespace(checkpoint=None), SimpleNamespace(checkpoint=None)
    trials = [trial, others]
    kept_by_other = tmp_path / "other" / "checkpoint_000000"
    kept_by_other.mkdir(parents=True)
    others.checkpoint = Checkpoint.from_directory(str(kept_by_other))
    retention.on_checkpoint(iteration=0, trials=trials, trial=others, checkpoint=others.checkpoint)
    named = []                                          # the checkpoint each save names, oldest first
    for epoch in range(2 * RECENT + 3):
        folder = tmp_path / "trial" / f"checkpoint_{epoch:06d}"
        folder.mkdir(parents=True)
        trial.checkpoint = Checkpoint.from_directory(str(folder))
        retention.on_checkpoint(iteration=epoch, trials=trials, trial=trial, checkpoint=trial.checkpoint)
        if epoch % 2:                                   # a checkpoint no save ever names: the next one replaced it
            continue
        assert retention.get_state() is None            # Tune writes no callback-state file for it
        named.append(folder)
        existing = sorted(p.name for p in (tmp_path / "trial").iterdir())
        assert existing == sorted(p.name for p in named[-RECENT:]), epoch
        assert kept_by_other.is_dir()                   # another trial's latest checkpoint stays
    assert len(named) > RECENT                          # so the oldest ones really were deleted


def test_keep_best_keeps_the_checkpoint_tune_ranks_best_until_and_after_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv(SMALL_BOOKKEEPING_ENV, "1")     # as the runner sets it: Tune keeps only each score
    manager = _CheckpointManager(CheckpointConfig(checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE))
    trial = SimpleNamespace(run_metadata=SimpleNamespace(checkpoint_manager=manager), checkpoint=None,
                            storage=SimpleNamespace(trial_fs_path=str(tmp_path / "trial")))
    retention = CheckpointRetention(keep_best=True)
    scores = [0.5, 0.8, 0.6, 0.8, 0.7, 0.4, 0.3, 0.6, 0.2, 0.1, 0.75]   # a tie: the later epoch ranks first
    for epoch, score in enumerate(scores):
        folder = tmp_path / "trial" / f"checkpoint_{epoch:06d}"
        folder.mkdir(parents=True)
        checkpoint = Checkpoint.from_directory(str(folder))
        manager.register_checkpoint(_TrainingResult(checkpoint=checkpoint, metrics={METRIC: score, "epoch": epoch}))
        trial.checkpoint = checkpoint
        retention.on_checkpoint(iteration=epoch, trials=[trial], trial=trial, checkpoint=checkpoint)
        retention.get_state()
        best = max(range(epoch + 1), key=lambda e: (scores[e], e))
        assert (tmp_path / "trial" / f"checkpoint_{best:06d}").is_dir(), epoch
    assert len(list((tmp_path / "trial").iterdir())) <= RECENT + 1      # the others did go
    restored = pickle.loads(pickle.dumps(retention))                     # as Tune restores it on --resume
    assert restored.keep_best and not restored._reported
    keep_latest_checkpoints([trial], keep_best=True)
    assert sorted(p.name for p in (tmp_path / "trial").iterdir()) == ["checkpoint_000003", "checkpoint_000010"]
    keep_latest_checkpoints([trial])
    assert sorted(p.name for p in (tmp_path / "trial").iterdir()) == ["checkpoint_000010"]
