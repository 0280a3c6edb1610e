"""Fault injection on a real local Ray: a trial's worker process is SIGKILLed mid-training (retried), a trial
diverges and a trial meets a truncated PNG (deterministic: not retried), in one tiny ablation run as the user
runs it (`python sweeps/run_ablation.py` in a subprocess), logged to the embedded MLflow store the tests read.

Covered elsewhere, not repeated here:
  driver killed mid-sweep, then --resume
      tests/test_sweeps.py::test_until_decided_adds_seeds_only_to_the_undecided_arm_and_resumes_after_a_kill
      (an adaptive sweep) and tests/test_train_best.py (final training's grid of members)
  cache build killed mid-way, then rebuilt
      tests/test_cache.py::test_killed_build_is_never_read_as_valid
  same config and seed give identical metrics
      tests/test_train.py::test_same_config_and_seed_give_identical_metrics
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from sweeps.trial_processes import trial_workers
from trainable.config import TrialConfig
from trainable.data.nih import DataSpec, prepare_dataset
from trainable.data.synthetic import generate
from trainable.train import SplitArrays

REPO = Path(__file__).resolve().parents[1]
TINY = ["--set", "backbone=test_resnet", "--set", "pretrained=none",
        "--set", "batch_size=16", "--cpus-per-trial", "1"]
EPOCHS = 5                       # the worker is killed once epoch 2 is checkpointed: 3 epochs are left
MAX_FAILURES = 2
NAME = "faults"
KILLED_TRIAL, DIVERGED_TRIAL, CORRUPT_TRIAL = "tiny-s0", "diverge-s0", "baseline-s0"
IMAGE_SIZE = 32
# tiny and diverge train at 32 px from a cache built before one PNG was truncated; diverge (SGD at an absurd
# learning rate) has a NaN/inf loss within the first steps (see test_train_loop). The baseline, at its 224 px,
# decodes the images afresh and meets the truncated PNG.
ARMS_FILE = ("tiny: {image_size: 32, factor: resolution}\n"
             "diverge: {optimizer: sgd, lr: 1.0e6, momentum: 0.9, image_size: 32, factor: divergence}\n")
TIMEOUT_S = 600
# The ablation CLI with the driver's cache warm-up left out, as for a node that joined after it: the baseline
# trial then builds its 224-px cache itself and meets the truncated PNG (the warm-up would stop the whole sweep
# at it instead: tests/test_sweeps_cluster.py).
WARM_UP_SKIPPED = ("import sys; from sweeps import runner; from sweeps.ablation import Ablation; "
                   "runner.warm_node_caches = lambda *args, **kwargs: None; sys.exit(runner.main(Ablation))")

pytestmark = pytest.mark.slow


# --- the sweep ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """tiny (its worker SIGKILLed once, after its epoch-2 checkpoint), diverge (NaN loss) and baseline (a
    truncated PNG), 1 seed each.

    Returns (out folder, exit code, stdout, killed pid, path of the checkpoint seen before the kill, stderr,
    the truncated image)."""
    root = tmp_path_factory.mktemp("faults")
    data = generate(root / "data", patients=100, image_size=32, seed=2).resolve()   # as the runner resolves it
    (root / "arms.yaml").write_text(ARMS_FILE)
    out = root / "out"
    # The 32-px caches the sweep's data split will key to, built before one training image is truncated.
    prepared = prepare_dataset(DataSpec(data_dir=str(data)), root / "split")
    for split in ("train", "val"):
        SplitArrays.load(prepared, split, TrialConfig(pretrained="none", image_size=IMAGE_SIZE), root / "cache")
    truncated = Path(prepared.subset("train")["path"].iloc[0])
    truncated.write_bytes(truncated.read_bytes()[:120])     # the PNG signature survives: only decoding finds it
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
           "CXR_CACHE_DIR": str(root / "cache"), "PYTHONUNBUFFERED": "1"}
    # --address local: a Ray of its own, whose processes all descend from the driver (never another user's Ray)
    command = [sys.executable, "-c", WARM_UP_SKIPPED, "--data", str(data), "--out", str(out),
               "--name", NAME, "--arms", "tiny,diverge", "--arms-file", str(root / "arms.yaml"),
               "--seeds", "1",
               "--epochs", str(EPOCHS), "--max-failures", str(MAX_FAILURES), "--address", "local", *TINY]
    with open(root / "stdout.txt", "w") as stdout, open(root / "stderr.txt", "w") as stderr:
        driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        # Synchronous reporting: the trial computes epoch 2 only after the driver registered epoch 1's checkpoint,
        # so once checkpoint_000001 is on the storage the trial has a checkpoint to resume from.
        deadline = time.monotonic() + TIMEOUT_S
        seen: list[str] = []
        while not seen:
            assert driver.poll() is None, "the sweep ended before its worker could be killed"
            assert time.monotonic() < deadline, "no epoch-2 checkpoint in time"
            seen = [str(p) for p in out.glob(f"{NAME}/{KILLED_TRIAL}_*/checkpoint_000001")]
            time.sleep(0.05)
        workers = trial_workers(driver.pid, KILLED_TRIAL)
        assert len(workers) == 1, f"expected one worker process of {KILLED_TRIAL}, found {workers}"
        os.kill(workers[0], signal.SIGKILL)
        code = driver.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    text, errors = (root / "stdout.txt").read_text(), (root / "stderr.txt").read_text()
    print(text[-5000:], errors[-5000:], sep="\n")  # shown when a test fails
    return out, code, text, workers[0], seen[0], errors, truncated


def _runs(out: Path):
    """(client, parent run, list of child runs): every run of the experiment, duplicates included."""
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(NAME).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    return client, parents[0], [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]


def _child(children, name):
    mine = [r for r in children if r.info.run_name == name]
    assert len(mine) == 1, f"{name}: {len(mine)} child runs, expected exactly one"
    return mine[0]


def _results(out: Path, trial_name: str) -> list[dict]:
    [folder] = out.glob(f"{NAME}/{trial_name}_*")
    return [json.loads(line) for line in (folder / "result.json").read_text().splitlines() if line.strip()]


def _attempts(out: Path, trial_name: str) -> int:
    """How many times Tune ran the trial and saw it fail: its error.txt has one 'Failure # N' per failure."""
    [folder] = out.glob(f"{NAME}/{trial_name}_*")
    return len(re.findall(r"^Failure # \d+", (folder / "error.txt").read_text(), flags=re.MULTILINE))


def test_sweep_finishes_and_exits_2_because_a_trial_failed_on_bad_input(sweep):
    """Documented codes: 2 when a trial failed on bad input (the truncated PNG), after the sweep ran to its end."""
    out, code, stdout, _, _, stderr, truncated = sweep
    assert code == 2
    assert "2 trial(s) failed" in stdout and "AUC mean ± sd" in stdout
    [line] = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert re.fullmatch(rf"error: 1 trial\(s\) failed on bad input, each once \(not retried\); first: "
                        rf"{re.escape(str(truncated))}: corrupt or truncated PNG .*", line), line
    client, parent, children = _runs(out)
    assert parent.info.status == "FINISHED" and parent.data.tags["failed_trials"] == "2"
    assert sorted(r.info.run_name for r in children) == sorted([KILLED_TRIAL, DIVERGED_TRIAL, CORRUPT_TRIAL])


def test_killed_worker_resumes_from_its_checkpoint_in_the_same_mlflow_run(sweep):
    out, _, _, killed, _, _, _ = sweep
    client, _, children = _runs(out)
    run = _child(children, KILLED_TRIAL)
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("retries") == "1"
    assert "error" not in run.data.tags and "interrupted" not in run.data.tags
    for key in ("val_auc_mean", "val_loss", "val_auc_Hernia"):
        history = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert history == list(range(1, EPOCHS + 1)), key        # each epoch once: continued, not duplicated
    # Tune's own record of what the trial reported: a second process took over and went on from a checkpoint,
    # so epoch 1 (before any checkpoint) was never trained again. Which checkpoint depends on where the kill
    # fell: before the driver registered epoch 2's, the retry trains epoch 2 again from epoch 1's (MLflow, checked
    # above, logs it once); after, it starts at epoch 3, and result.json may lack epoch 2 (on restart Tune's
    # JSON logger copies the file back from --storage, whose copy can lag one sync behind).
    results = _results(out, KILLED_TRIAL)
    pids = list(dict.fromkeys(r["pid"] for r in results))
    assert len(pids) == 2 and pids[0] == killed, (pids, killed)
    first, retry = ([r["epoch"] for r in results if r["pid"] == pid] for pid in pids)
    assert first == list(range(1, len(first) + 1)), first
    assert retry[0] >= 2 and retry == list(range(retry[0], EPOCHS + 1)), retry
    assert _attempts(out, KILLED_TRIAL) == 1                       # the kill, then a successful retry
    assert run.data.tags["device"] == "cpu" and run.data.tags["node"]


@pytest.mark.parametrize("trial, error", [
    (DIVERGED_TRIAL, r"TrialDiverged: training loss became (nan|inf) at epoch 1"),
    (CORRUPT_TRIAL, r"DataError: .*\.png: corrupt or truncated PNG"),
])
def test_deterministic_failure_fails_at_once_with_its_reason_and_the_sweep_goes_on(sweep, trial, error):
    """--max-failures 2, yet one attempt: Tune ran it once, no retry in MLflow, the reason on the run."""
    out, _, _, _, _, _, _ = sweep
    client, _, children = _runs(out)
    run = _child(children, trial)
    assert run.info.status == "FAILED"
    assert re.search(error, run.data.tags["error"]), run.data.tags["error"]
    assert "retries" not in run.data.tags
    assert _attempts(out, trial) == 1
    assert "error.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert client.get_metric_history(run.info.run_id, "val_auc_mean") == []
    assert _child(children, KILLED_TRIAL).info.status == "FINISHED"


def test_no_run_is_left_running(sweep):
    out, _, _, _, _, _, _ = sweep
    client, parent, children = _runs(out)
    assert [r.info.run_name for r in [parent, *children] if r.info.status == "RUNNING"] == []
