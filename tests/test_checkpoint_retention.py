"""CheckpointRetention on real checkpoint folders: a checkpoint that one of the last RECENT saved experiment states
names is never deleted (the storage's copy of the state may lag that far behind), older ones are.

The callback reads nothing of a trial but its latest checkpoint, so a namespace with that attribute stands in for
Tune's Trial; the end-to-end sweeps (tests/test_sweeps.py) run it inside Tune."""
from __future__ import annotations

from types import SimpleNamespace

from ray.tune import Checkpoint

from sweeps.checkpoint_retention import CheckpointRetention
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
