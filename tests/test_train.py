"""End to end: one trial from the shell on a generated NIH-format data set, on the CPU, and its exact resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from trainable.__main__ import main
from trainable.data.synthetic import generate
from trainable.findings import FINDINGS
from trainable.config import TrialConfig
from trainable.metric_names import (DEVICE_HOURS, FLOPS_PER_IMAGE, PARAM_COUNT, PEAK_GPU_MEMORY_MB, PEAK_RSS_MB,
                                    TRAIN_FLOPS, WALL_SECONDS)
from trainable.models import create_model
from trainable.train import TIMING_METRICS

REPO = Path(__file__).resolve().parents[1]
# Exact resume and repeatability are CPU guarantees; on a GPU they need deterministic mode (trainable/backends.py).
TINY = ["--preset", "chexnet_replica", "--set", "backbone=test_resnet", "--set", "pretrained=none",
        "--set", "image_size=64", "--set", "epochs=2", "--set", "batch_size=16",
        "--set", f"deterministic={torch.cuda.is_available()}"]
KILL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def learnable_dir(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("nih") / "data", patients=300, image_size=64, seed=1)


@pytest.fixture(scope="module")
def trial(learnable_dir, tmp_path_factory):
    """One uninterrupted 2-epoch trial: (output folder, cache folder)."""
    out, cache = tmp_path_factory.mktemp("trial") / "out", tmp_path_factory.mktemp("cache")
    assert main(["--data", str(learnable_dir), "--out", str(out), "--cache-dir", str(cache), *TINY]) == 0
    return out, cache


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_trial_writes_one_metrics_line_per_epoch_with_every_finding(trial):
    out, _ = trial
    lines = read_metrics(out)
    assert [line["epoch"] for line in lines] == [1, 2]
    for line in lines:
        for finding in FINDINGS:
            assert 0.0 <= line[f"val_auc_{finding}"] <= 1.0
            assert 0.0 <= line[f"val_f1_{finding}"] <= 1.0
        assert {"val_loss", "val_auc_mean", "val_f1_mean"} <= set(line)
        assert line["synthetic_data"] is True
    assert {"split.csv", "config.json", "val_predictions.npz", "thresholds.json"} <= {p.name for p in out.iterdir()}


def test_tiny_model_learns_the_synthetic_signatures(trial):
    assert read_metrics(trial[0])[-1]["val_auc_mean"] > 0.7


def test_reported_metrics_equal_sklearn_on_the_saved_probabilities(trial):
    out, _ = trial
    last = read_metrics(out)[-1]
    saved = np.load(out / "val_predictions.npz")
    labels, probs = saved["labels"], saved["probs"]
    thresholds = json.loads((out / "thresholds.json").read_text())
    split = pd.read_csv(out / "split.csv")
    assert sorted(saved["images"]) == sorted(split.loc[split["split"] == "val", "image"])
    aucs = [roc_auc_score(labels[:, k], probs[:, k]) for k in range(len(FINDINGS))]
    f1s = [f1_score(labels[:, k], probs[:, k] >= thresholds[f], zero_division=0) for k, f in enumerate(FINDINGS)]
    for k, finding in enumerate(FINDINGS):
        assert last[f"val_auc_{finding}"] == pytest.approx(aucs[k], abs=1e-9)
        assert last[f"val_f1_{finding}"] == pytest.approx(f1s[k], abs=1e-9)
    assert last["val_auc_mean"] == pytest.approx(np.mean(aucs), abs=1e-9)


def hooked_flops(model, image_size: int) -> int:
    """FLOPs of one forward at batch 1 counted by hand: 2 per multiply-add of every convolution and linear layer."""
    total = []

    def conv(module, inputs, output):
        kernel = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        total.append(2 * output.numel() * kernel)

    def linear(module, inputs, output):
        total.append(2 * output.numel() * module.in_features)

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(conv)
        elif isinstance(module, torch.nn.Linear):
            module.register_forward_hook(linear)
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, image_size, image_size), torch.zeros(1, 0))
    return sum(total)


def test_trial_logs_what_it_costs_and_the_counts_equal_a_direct_computation(trial):
    out, _ = trial
    lines = read_metrics(out)
    cfg = TrialConfig.from_dict(json.loads((out / "config.json").read_text()))
    model = create_model(cfg)
    assert lines[-1][PARAM_COUNT] == sum(t.numel() for t in dict(model.named_parameters()).values())
    assert lines[-1][FLOPS_PER_IMAGE] == hooked_flops(model, cfg.image_size) > 0
    train_images = int((pd.read_csv(out / "split.csv")["split"] == "train").sum())
    for epoch, line in enumerate(lines, start=1):
        assert line[TRAIN_FLOPS] == 3 * line[FLOPS_PER_IMAGE] * train_images * epoch
        assert line[DEVICE_HOURS] == pytest.approx(line[WALL_SECONDS] / 3600)
    assert lines[1][WALL_SECONDS] == pytest.approx(lines[0]["epoch_seconds"] + lines[1]["epoch_seconds"])
    # on the CPU the peak is the process's resident set, named as such (never a GPU figure)
    peak = PEAK_GPU_MEMORY_MB if torch.cuda.is_available() else PEAK_RSS_MB
    assert 10 < lines[-1][peak] < 64 * 1024 and not {PEAK_GPU_MEMORY_MB, PEAK_RSS_MB} - {peak} & set(lines[-1])


@pytest.mark.exact_resume
def test_a_trial_killed_right_after_its_first_report_resumes_from_it_exactly(trial, learnable_dir, tmp_path):
    """The epoch-1 line in metrics.jsonl is the report: the process is SIGKILLed the moment it appears (the
    checkpoint was written by the background writer, the next epoch is training), then resumed from the
    checkpoint that report named; its epoch 2 is the uninterrupted run's."""
    out, cache = trial
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "trainable", "--data", str(learnable_dir), "--out", str(killed),
               "--cache-dir", str(cache), *TINY]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    try:
        while not (killed / "metrics.jsonl").is_file() or not (killed / "metrics.jsonl").read_text():
            assert process.poll() is None and time.monotonic() < deadline, "no epoch-1 report"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert [line["epoch"] for line in read_metrics(killed)] == [1]
    assert main(["--data", str(learnable_dir), "--out", str(killed), "--cache-dir", str(cache), *TINY,
                 "--resume", str(killed / "checkpoints" / "epoch_001")]) == 0
    again, expected = read_metrics(killed), read_metrics(out)
    assert [line["epoch"] for line in again] == [1, 2]
    for key in ["val_loss", "train_loss", "val_auc_mean", "val_f1_mean", *(f"val_auc_{f}" for f in FINDINGS)]:
        assert again[1][key] == pytest.approx(expected[1][key], rel=1e-6, abs=1e-9), key


@pytest.mark.exact_resume
def test_same_config_and_seed_give_identical_metrics(trial, learnable_dir, tmp_path):
    out, cache = trial
    assert main(["--data", str(learnable_dir), "--out", str(tmp_path / "again"), "--cache-dir", str(cache),
                 *TINY]) == 0
    first, second = read_metrics(out), read_metrics(tmp_path / "again")
    for a, b in zip(first, second):
        assert {k: v for k, v in a.items() if k not in TIMING_METRICS} == \
            {k: v for k, v in b.items() if k not in TIMING_METRICS}


def test_bad_config_fails_before_writing_anything(learnable_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--data", str(learnable_dir), "--out", str(out), *TINY, "--set", "loss=hinge"]) == 2
    assert "loss='hinge' is not one of" in capsys.readouterr().err
    assert not out.exists()


def test_non_empty_output_is_not_overwritten(trial, learnable_dir, capsys):
    out, _ = trial
    before = (out / "metrics.jsonl").read_text()
    assert main(["--data", str(learnable_dir), "--out", str(out), *TINY]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before
