"""train() in process: every factor family runs inside a real trial, divergence and early stopping end it."""
import math

import numpy as np
import pytest
import torch

from trainable.config import TrialConfig
from trainable.errors import TrialDiverged
from trainable.train import PREDICTIONS_FILE, STATE_FILE, THRESHOLDS_FILE, TrialProgress, train

TINY = dict(backbone="test_resnet", pretrained="none", image_size=32, epochs=1, batch_size=16)


def run(prepared, cache_dir, **overrides):
    reports = []

    def report(metrics, checkpoint):
        reports.append((metrics, sorted(p.name for p in checkpoint.iterdir())))

    result = train(TrialConfig(**{**TINY, **overrides}), prepared, report, cache_dir=cache_dir)
    return result, reports


@pytest.mark.parametrize("overrides", [
    dict(head="cbam", loss="focal", optimizer="adamw", scheduler="cosine", warmup_epochs=1, epochs=2),
    dict(loss="dynamic_weighted_bce", aug_resized_crop=True, aug_color_jitter=True, aug_rotation=True),
    dict(loss="weighted_bce", oversample="rare", demographics="age_sex_view", optimizer="sgd"),
    dict(loss="asl", demographics="age_sex", precision="bf16"),
    dict(loss="db", backbone="test_vit", head="cbam"),
    dict(loss="zlpr", backbone="test_efficientnet", scheduler="none"),
])
def test_every_factor_family_trains_and_reports(prepared, cache_dir, overrides):
    result, reports = run(prepared, cache_dir, **overrides)
    assert len(reports) == TrialConfig(**{**TINY, **overrides}).epochs
    for metrics, files in reports:
        assert files == sorted([STATE_FILE, PREDICTIONS_FILE, THRESHOLDS_FILE])
        assert math.isfinite(metrics["val_loss"]) and math.isfinite(metrics["train_loss"])
        assert 0.0 <= metrics["val_auc_mean"] <= 1.0
    assert result.last["epoch"] == reports[-1][0]["epoch"]


def test_exploding_loss_fails_the_trial_with_the_reason(prepared, cache_dir):
    with pytest.raises(TrialDiverged, match=r"training loss became (nan|inf) at epoch 1"):
        run(prepared, cache_dir, optimizer="sgd", lr=1e6, momentum=0.9, epochs=2)


def test_early_stopping_rule():
    progress = TrialProgress()
    for epoch, auc in enumerate([0.60, 0.70, 0.69, 0.70], start=1):
        progress.update(epoch, auc)
    assert (progress.best_epoch, progress.epochs_without_gain, progress.next_epoch) == (2, 2, 5)
    assert progress.should_stop(2) and not progress.should_stop(3) and not progress.should_stop(0)


def test_early_stopping_ends_the_trial_where_the_rule_says(prepared, cache_dir):
    result, reports = run(prepared, cache_dir, lr=0.05, optimizer="sgd", epochs=6, early_stop_patience=1)
    aucs = [m["val_auc_mean"] for m, _ in reports]
    # the first epoch that fails to beat every earlier one ends the trial (patience 1)
    expected_stop = next((e for e in range(1, 6) if aucs[e] <= max(aucs[:e])), 5) + 1
    assert len(reports) == expected_stop
    assert result.stopped_early == (expected_stop < 6)
    # the flag that tells a sweep this trial ended itself (a scheduler's stop is not marked)
    assert [m["early_stopped"] for m, _ in reports] == [0.0] * (expected_stop - 1) + [float(expected_stop < 6)]
    assert result.best_epoch == int(np.argmax(aucs)) + 1


def test_checkpoint_holds_model_optimizer_scheduler_and_progress(prepared, cache_dir, tmp_path):
    kept = {}

    def report(metrics, checkpoint):
        kept.update(torch.load(checkpoint / STATE_FILE, weights_only=True))
        saved = np.load(checkpoint / PREDICTIONS_FILE)
        kept["probs"] = saved["probs"]

    train(TrialConfig(**TINY), prepared, report, cache_dir=cache_dir)
    assert {"model", "optimizer", "scheduler", "progress", "config", "rng"} <= set(kept)
    assert kept["progress"]["next_epoch"] == 2
    assert kept["probs"].shape == (len(prepared.subset("val")), 14)


def test_aucm_with_pesg_resumes_exactly_with_the_losses_own_variables(prepared, cache_dir, tmp_path):
    """LibAUC's AUC-margin loss trains a real trial with its PESG; the loss's own a, b, alpha are checkpointed,
    so epoch 2 after a resume is the uninterrupted epoch 2."""
    import shutil
    cfg = dict(loss="aucm", optimizer="pesg", lr=0.1, epochs=2)
    saved = {}

    def keep(metrics, checkpoint):
        saved[metrics["epoch"]] = shutil.copytree(checkpoint, tmp_path / f"epoch{metrics['epoch']}")

    straight = train(TrialConfig(**{**TINY, **cfg}), prepared, keep, cache_dir=cache_dir)
    state = torch.load(saved[1] / STATE_FILE, weights_only=True)
    assert float(state["criterion"]["loss.alpha"].abs().sum()) > 0          # PESG moved the dual variable
    resumed = train(TrialConfig(**{**TINY, **cfg}), prepared, lambda m, c: None, cache_dir=cache_dir,
                    resume_from=saved[1])
    assert resumed.history[0]["epoch"] == 2
    assert resumed.history[0]["val_loss"] == straight.history[1]["val_loss"]
    assert resumed.history[0]["val_auc_mean"] == straight.history[1]["val_auc_mean"]
