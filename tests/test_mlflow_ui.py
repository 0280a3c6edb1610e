"""The MLflow UI, started as the README says, shows a sweep's parent run, its child runs and per-finding metric
charts: checked in headless chromium by dashboards/check_mlflow_ui.py, on a store written in the sweeps' layout
(sweeps.tracking's parent run; child runs named, tagged and logged as sweeps/mlflow_logger.py does)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from dashboards.mlflow_store import PARENT_RUN_TAG
from sweeps.tracking import SweepRun
from trainable.config import TrialConfig
from trainable.findings import FINDINGS
from trainable.metrics import epoch_metrics

REPO = Path(__file__).resolve().parents[1]
ARMS, SEEDS, EPOCHS = {"baseline": {}, "focal": {"loss": "focal"}}, 2, 3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "chromium is not installed (Debian: apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run the MLflow UI check")
        pytest.skip(message)
    return path


def write_sweep(uri: str, name: str, artifact_root: str) -> None:
    """An ablation sweep as sweeps/ logs it: parent run, one child run `<arm>-s<seed>` per trial with the flat
    TrialConfig as params and per-epoch validation metrics."""
    client = MlflowClient(uri)
    sweep = SweepRun.start(client, name, artifact_root=artifact_root, params={"arms": ",".join(ARMS), "seeds": SEEDS},
                           tags={"kind": "ablation", "data": "SYNTHETIC"})
    rng = np.random.default_rng(0)
    labels = rng.random((60, len(FINDINGS))) < 0.3
    for arm, overrides in ARMS.items():
        for seed in range(SEEDS):
            config = TrialConfig(backbone="test_resnet", pretrained="none", seed=seed, **overrides)
            run = client.create_run(sweep.experiment_id, run_name=f"{arm}-s{seed}",
                                    tags={"kind": "ablation", "arm": arm, "factor": arm, "seed": str(seed),
                                          "trial_id": f"t{arm}{seed}", PARENT_RUN_TAG: sweep.parent_run_id})
            now = int(time.time() * 1000)
            metrics = []
            for epoch in range(1, EPOCHS + 1):
                probs = np.clip(labels * 0.2 * epoch + rng.random(labels.shape) * 0.6, 0, 1)
                values, _ = epoch_metrics(labels, probs, val_loss=1 / epoch)
                metrics += [Metric(key, value, now, epoch) for key, value in values.items()]
            client.log_batch(run.info.run_id, metrics=metrics,
                             params=[Param(k, str(v)) for k, v in config.to_dict().items()])
            client.set_terminated(run.info.run_id)
    sweep.end("FINISHED")


def test_mlflow_ui_shows_parent_child_runs_and_per_finding_charts(browser, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    write_sweep(uri, "abl", (tmp_path / "mlartifacts").as_uri())
    screenshot = tmp_path / "shots" / "mlflow-ui.png"
    done = subprocess.run([sys.executable, str(REPO / "dashboards" / "check_mlflow_ui.py"), "--backend-store-uri", uri,
                           "--experiment", "abl", "--screenshot", str(screenshot), "--browser", browser],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    print(done.stdout, done.stderr[-3000:], sep="\n")
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("PASS") for line in lines)
    assert "lists parent run 'abl' and 4 of 4 child runs" in lines[0]
    shots = screenshot.parent
    for path in (screenshot, shots / "mlflow-ui-child-run.png", shots / "mlflow-ui-metrics.png"):
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    keep = os.environ.get("MLFLOW_UI_SCREENSHOT_DIR")   # to look at them after the test
    if keep:
        shutil.copytree(screenshot.parent, keep, dirs_exist_ok=True)
