"""End to end: real tiny sweeps (timm test_resnet at 32 px, generated data) on a local Ray, as the user runs them
(`python sweeps/run_*.py` in a subprocess), logged to a real MLflow SQLite store that the test reads back."""
from __future__ import annotations

import glob
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
import timm
import torch
from conftest import PLANTED_ARMS, PLANTED_EPOCHS, PLANTED_SEEDS
from mlflow import MlflowClient

from dashboards import ablation_report
from sweeps.ablation import Ablation
from sweeps.record import SweepLocation
from sweeps.runner import main
from sweeps.search import Search
from sweeps.tune_state import StateDigests
from trainable.config import TrialConfig
from trainable.data.synthetic import generate
from trainable.errors import ConfigError
from trainable.findings import FINDINGS

REPO = Path(__file__).resolve().parents[1]
TINY = ["--set", "backbone=test_resnet", "--set", "image_size=32", "--set", "pretrained=none",
        "--set", "batch_size=16", "--cpus-per-trial", "1"]
ARMS, SEEDS, EPOCHS = PLANTED_ARMS, PLANTED_SEEDS, PLANTED_EPOCHS     # of the shared ablation (conftest)
SWEEP_TIMEOUT_S = 600

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The sweeps' environment: a local Ray and the embedded MLflow store, a private image cache."""
    variables = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**variables, "CXR_CACHE_DIR": str(tmp_path_factory.mktemp("cache")), "PYTHONUNBUFFERED": "1"}


def command(script: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "sweeps" / script), *args]


def run_sweep(env, script: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command(script, *args), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=SWEEP_TIMEOUT_S)
    print(done.stdout[-5000:], done.stderr[-5000:], sep="\n")  # shown by pytest when a test fails
    return done


def mlflow_runs(out: Path, experiment: str):
    """(client, parent run, child runs by name) of a sweep's MLflow experiment."""
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    names = [r.info.run_name for r in children]
    assert len(names) == len(set(names)), names  # a duplicated or orphaned child run would hide in the dict
    return client, parents[0], {r.info.run_name: r for r in children}


def steps(client, run, key="val_auc_mean") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


# --- ablation ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ablation(planted_ablation):
    """(--out, the CompletedProcess) of conftest's ablation `abl`: baseline, baseline_copy and age_sex."""
    return planted_ablation["out"], planted_ablation["done"]


def test_ablation_logs_one_parent_and_a_child_per_arm_and_seed(ablation):
    out, done = ablation
    assert done.returncode == 0
    client, parent, children = mlflow_runs(out, "abl")
    assert sorted(children) == sorted(f"{arm}-s{seed}" for arm in ARMS for seed in range(SEEDS))
    for name, run in children.items():
        arm, seed = name.rsplit("-s", 1)
        assert run.info.status == "FINISHED"
        assert (run.data.tags["arm"], run.data.tags["seed"]) == (arm, seed)
        assert run.data.tags["factor"] == {"baseline": "baseline", "baseline_copy": "control",
                                           "age_sex": "demographics"}[arm]
        for finding in FINDINGS:
            assert steps(client, run, f"val_auc_{finding}") == list(range(1, EPOCHS + 1)), (name, finding)
            assert steps(client, run, f"val_f1_{finding}") == list(range(1, EPOCHS + 1)), (name, finding)
        for key in ("val_loss", "val_auc_mean", "val_f1_mean"):
            assert steps(client, run, key) == list(range(1, EPOCHS + 1))
        # params are the resolved flat TrialConfig: the arm's change, the seed, and --set for every arm
        config = TrialConfig.from_dict(run.data.params)
        assert (config.seed, config.epochs, config.backbone, config.image_size) == (int(seed), EPOCHS, "test_resnet", 32)
        assert config.demographics == ("age_sex" if arm == "age_sex" else "none") and config.lr == 0.01
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"val_predictions.npz", "thresholds.json"} <= artifacts
        # where it ran: this machine's CPU, node and library versions
        assert run.data.tags["device"] == "cpu" and socket.gethostname() in run.data.tags["node"]
        assert (run.data.tags["torch_version"], run.data.tags["timm_version"]) == (torch.__version__, timm.__version__)
        assert run.data.tags["cuda_version"] == (torch.version.cuda or "none")


def test_ablation_parent_run_records_the_sweep(ablation):
    out, _ = ablation
    _, parent, _ = mlflow_runs(out, "abl")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["data"] == "SYNTHETIC" and parent.data.tags["synthetic_data"] == "True"
    assert parent.data.params["arms"] == ",".join(ARMS) and parent.data.params["seeds"] == str(SEEDS)
    assert parent.data.params["data_fingerprint"] == parent.data.tags["data_fingerprint"]
    assert int(parent.data.params["split_val_images"]) > 0
    assert parent.data.tags["git_commit"]
    record = json.loads((out / "abl" / "sweep.json").read_text())
    assert record["mlflow"]["parent_run_id"] == parent.info.run_id
    assert record["plan"]["seeds"] == list(range(SEEDS))


def test_a_finished_sweep_keeps_only_each_trials_latest_checkpoint(ablation):
    out, _ = ablation
    folders = sorted(p for p in (out / "abl").iterdir() if p.is_dir())
    assert len(folders) == len(ARMS) * SEEDS
    for folder in folders:
        assert [p.name for p in folder.glob("checkpoint_*")] == [f"checkpoint_{EPOCHS - 1:06d}"], folder


def test_ablation_prints_a_table_per_arm_with_delta_vs_baseline(ablation):
    _, done = ablation
    text = done.stdout
    assert "SYNTHETIC" in text and "single-split validation" in text.lower()
    table = text[text.index("AUC mean ± sd"):].splitlines()
    rows = {line.split()[0]: line for line in table[2:2 + len(ARMS)]}
    assert set(rows) == set(ARMS)
    assert rows["age_sex"].split()[2] == str(SEEDS) and "±" in rows["age_sex"]
    assert "mlflow ui --backend-store-uri sqlite:///" in text and "--host 127.0.0.1" in text


# --- search -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def search(env, synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    done = run_sweep(env, "run_search.py", "--data", str(synthetic_dir), "--out", str(out), "--name", "srch",
                     "--num-samples", "6", "--epochs", "3", "--reduction-factor", "2", *TINY)
    return out, done


def test_search_with_asha_stops_trials_early_and_marks_them_pruned(search):
    out, done = search
    assert done.returncode == 0
    client, parent, children = mlflow_runs(out, "srch")
    assert len(children) == 6
    pruned = {name for name, run in children.items() if run.data.tags.get("pruned") == "true"}
    assert pruned, "ASHA stopped no trial"
    for name, run in children.items():
        if name in pruned:
            assert run.info.status == "KILLED" and steps(client, run)[-1] < 3
            assert run.data.tags["pruned_at_epoch"] == str(steps(client, run)[-1])
        else:
            assert run.info.status == "FINISHED" and steps(client, run) == [1, 2, 3]
    # Optuna was told PRUNED for exactly those trials, not COMPLETE with their partial value
    searcher = pickle.loads(Path(glob.glob(str(out / "srch" / "searcher-state-*.pkl"))[0]).read_bytes())
    states = [trial.state.name for trial in searcher["_ot_study"].trials]
    assert states.count("PRUNED") == len(pruned) and states.count("COMPLETE") == 6 - len(pruned)


def test_search_writes_the_best_full_budget_config(search):
    out, done = search
    client, parent, children = mlflow_runs(out, "srch")
    best = json.loads((out / "srch" / "best_config.json").read_text())
    config = TrialConfig.from_dict(best)
    assert (config.backbone, config.epochs) == ("test_resnet", 3)
    assert json.loads(parent.data.tags["best_config"]) == best
    winner = children[parent.data.tags["best_trial"]]
    assert winner.info.status == "FINISHED"
    finished = [r for r in children.values() if r.info.status == "FINISHED"]
    assert winner.data.metrics["val_auc_mean"] == max(r.data.metrics["val_auc_mean"] for r in finished)
    assert f"best: {parent.data.tags['best_trial']}" in done.stdout


# --- Tune state someone else wrote -------------------------------------------------------------------------------

class _RunsOnUnpickling:
    """A pickle that, when loaded, creates the file `marker`: what an attacker with write access to the storage
    would put into a sweep's Tune state."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _tamper_tuner(folder: Path, marker: Path) -> None:
    (folder / "tuner.pkl").write_bytes(pickle.dumps(_RunsOnUnpickling(marker)))


def _tamper_experiment_state(folder: Path, marker: Path) -> None:
    [state] = folder.glob("experiment_state-*.json")      # a finished trial made to look unfinished
    text = state.read_text()
    assert "TERMINATED" in text
    state.write_text(text.replace("TERMINATED", "PENDING", 1))


def _add_searcher_state(folder: Path, marker: Path) -> None:     # newer than any real one: Tune would load it
    (folder / "searcher-state-9999-12-31_23-59-59.pkl").write_bytes(pickle.dumps(_RunsOnUnpickling(marker)))


def _tamper_record(folder: Path, marker: Path) -> None:          # a resume obeys sweep.json's arguments
    record = json.loads((folder / "sweep.json").read_text())
    record["arguments"]["data"] = str(marker.parent)
    (folder / "sweep.json").write_text(json.dumps(record))


@pytest.mark.parametrize("tamper", [_tamper_tuner, _tamper_experiment_state, _add_searcher_state, _tamper_record],
                         ids=["tuner.pkl", "experiment_state", "added-searcher-state", "sweep.json"])
def test_resume_refuses_tune_state_that_the_driver_did_not_write(ablation, tmp_path, capsys, tamper):
    """The finished ablation's --out copied, one state file changed or added on the copy's storage, then
    --resume: refused in one line before Ray starts, and nothing of the file was unpickled."""
    out, _ = ablation
    copy = Path(shutil.copytree(out, tmp_path / "out"))
    marker = tmp_path / "code-ran"
    tamper(copy / "abl", marker)
    assert main(Ablation, ["--resume", "abl", "--out", str(copy)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: --resume abl: "), error
    assert re.search(r"(was changed after this sweep's driver wrote it|was not written by this sweep's driver).*"
                     r"refusing to go on", error[0]), error[0]
    assert not marker.exists() and not ray.is_initialized()


def test_every_tune_state_file_of_a_search_is_recorded_and_a_changed_searcher_state_is_found(search, tmp_path):
    out, _ = search
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    _, parent, _ = mlflow_runs(out, "srch")
    location = SweepLocation(str(out), "srch")
    digests = StateDigests.load(client, parent.info.run_id)
    verified = digests.verify(location, "check")
    assert {"tuner.pkl", "sweep.json"} | {p.name for p in (out / "srch").glob("searcher-state-*.pkl")} | \
        {p.name for p in (out / "srch").glob("experiment_state-*.json")} <= set(verified)
    copy = Path(shutil.copytree(out / "srch", tmp_path / "srch"))
    [searcher] = copy.glob("searcher-state-*.pkl")
    searcher.write_bytes(searcher.read_bytes() + b"\0")
    with pytest.raises(ConfigError, match=rf"{re.escape(searcher.name)} was changed after this sweep's driver"):
        digests.verify(SweepLocation(str(tmp_path), "srch"), "check")


# --- --until-decided: seeds only where the analysis is undecided; a driver killed mid-round resumes -------------

# An arm identical to the baseline (training is deterministic per seed: Δ = 0 exactly, and with a margin of 1e-4
# no number of seeds shows equivalence) stays undecided by construction; an arm that cannot learn (lr 1e-8:
# mean AUC ~0.5 against the baseline's ~0.87, seed sd ~0.01-0.05) is called `hurts` after the first round.
DECISIVE_ARMS = "baseline_copy: {factor: control}\nfrozen: {factor: optimizer, lr: 1.0e-8}\n"


def test_until_decided_adds_seeds_only_to_the_undecided_arm_and_resumes_after_a_kill(env, tmp_path):
    data = generate(tmp_path / "data", patients=240, image_size=32, seed=5)
    (tmp_path / "arms.yaml").write_text(DECISIVE_ARMS)
    out = tmp_path / "out"
    args = ["--data", str(data), "--out", str(out), "--name", "ud", "--arms", "baseline,baseline_copy,frozen",
            "--arms-file", str(tmp_path / "arms.yaml"), "--seeds", "2", "--max-seeds", "3", "--until-decided",
            "--margin", "0.0001", "--epochs", "2", "--val-fraction", "0.3", *TINY]
    sweep = subprocess.Popen(command("run_ablation.py", *args), cwd=REPO, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill driver, Ray and trials at once in round 2: once both of its trials have started (Tune starts the
    # second when a slot frees) and one has checkpointed its first epoch.
    def started() -> set[str]:
        return {m.group(1) for p in (out / "ud").glob("*_*") if p.is_dir() and (m := re.match(r"(.+-s\d+)_", p.name))}

    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    while not ({"baseline-s2", "baseline_copy-s2"} <= started()
               and glob.glob(str(out / "ud" / "*-s2_*" / "checkpoint_000000"))):
        assert sweep.poll() is None and time.monotonic() < deadline, "the sweep ended before it could be killed"
        time.sleep(0.5)
    os.killpg(sweep.pid, signal.SIGKILL)
    sweep.wait(timeout=60)
    # round 2 went to the undecided arm and the baseline only
    assert "frozen-s2" not in started() and not any(name.endswith("-s3") for name in started())
    client, parent, before = mlflow_runs(out, "ud")
    assert sum(run.info.status == "FINISHED" for run in before.values()) < len(before)
    # The child run of a trial Tune started after its last save (so the state a resume restores lacks it)
    late = client.create_run(parent.info.experiment_id, run_name="baseline_copy-s2",
                             tags={"trial_id": "begun_after_save", "mlflow.parentRunId": parent.info.run_id}).info

    done = run_sweep(env, "run_ablation.py", "--resume", "--out", str(out))
    assert done.returncode == 0
    # named in the one line that lists such runs (trials the kill caught between two saves may be there too)
    [said] = [line for line in done.stdout.splitlines() if line.startswith("resume: ")]
    assert "baseline_copy-s2" in said.removeprefix("resume: ").split(" began after Tune last saved the sweep")[0]
    late = client.get_run(late.run_id)
    assert late.info.lifecycle_stage == "deleted" and late.data.tags["superseded"] == "true"
    client, parent, children = mlflow_runs(out, "ud")
    assert sorted(children) == sorted(["baseline-s0", "baseline-s1", "baseline-s2", "baseline_copy-s0",
                                       "baseline_copy-s1", "baseline_copy-s2", "frozen-s0", "frozen-s1"])
    assert len({run.data.tags["trial_id"] for run in children.values()}) == len(children)
    for run in children.values():
        assert run.info.status == "FINISHED"
        assert steps(client, run) == [1, 2], run.info.run_name              # no epoch logged twice
        assert run.data.metrics["epoch_seconds"] > 0
    assert parent.info.status == "FINISHED" and parent.data.tags["resumes"] == "1"
    rounds = json.loads((out / "ud" / "seed_rounds.json").read_text())
    assert rounds["looks"] == [2, 3] and rounds["seeds"] == {"baseline_copy": 3, "frozen": 2}
    assert rounds["stops"] == {"frozen": "hurts after 2 seeds", "baseline_copy": "seed budget spent (3): undecided"}
    assert "seed_rounds.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    table = done.stdout[done.stdout.index("seeds stopped because"):].splitlines()
    rows = {line.split()[0]: line for line in table[2:5]}
    assert rows["frozen"].split()[2] == "2" and rows["frozen"].endswith("hurts after 2 seeds")
    assert rows["baseline_copy"].split()[2] == "3" and rows["baseline"].split()[2] == "3"

    # the report replays the same rounds from MLflow and says why each arm stopped
    report = tmp_path / "report"
    assert ablation_report.main(["--sweep", "ud", "--mlflow-uri", f"sqlite:///{out / 'mlflow.db'}", "--out",
                                 str(report), "--n-boot", "200", "--no-log"]) == 0
    effects = pd.read_csv(report / "effects.csv")
    head = effects[(effects["finding"] == "mean") & (effects["metric"] == "auc")].set_index("arm")
    assert head.loc["frozen", "verdict"] == "hurts" and head.loc["frozen", "n_seeds"] == 2
    assert head.loc["baseline_copy", "verdict"] == "inconclusive" and head.loc["baseline_copy", "n_seeds"] == 3
    assert head.loc["baseline_copy", "delta"] == 0.0
    assert dict(head["stopped"]) == rounds["stops"]


# --- refused before anything runs -------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, arms_text, expected", [
    (["--arms", "baseline,x"], "x: {los: focal}\n", r"arms\.yaml: arm 'x': unknown key\(s\) 'los'"),
    (["--arms", "baseline,x"], "x: {loss: focal\n", r"arms\.yaml: line \d+ is not valid YAML"),
    (["--arms", "baseline,x"], "x: {loss: hinge}\n", r"arm 'x': loss='hinge' is not one of"),
    (["--arms", "baseline,nope"], None, r"--arms 'baseline,nope': unknown arm\(s\) 'nope'; known arms: baseline"),
    (["--arms", "baseline,x"], "x: {loss: focal, seed: 7}\n", r"arms\.yaml: arm 'x': seed is set by the sweep"),
    (["--arms", "baseline,x"], "x: {loss: focal}\nx: {loss: asl}\n", r"arms\.yaml: line 2: 'x' is defined twice"),
    (["--set", "head=mlp"], None, r"arm 'baseline' with --set/--epochs: head='mlp' is not one of: linear, cbam"),
    (["--mlflow-uri", "http://me:s3cret@127.0.0.1:9"], None, r"--mlflow-uri http://127\.0\.0\.1:9: the "
                                                             r"MLflow tracking store does not answer"),
    (["--resume"], None, r"--resume: no ablation sweep in .* to resume"),
])
def test_bad_input_fails_in_one_line_before_ray_starts(synthetic_dir, tmp_path, capsys, monkeypatch, extra,
                                                       arms_text, expected):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):   # the runner sets them from the URI
        monkeypatch.setenv(name, "")
    args = ["--data", str(synthetic_dir), "--out", str(tmp_path / "out"), *TINY, *extra]
    if arms_text is not None:
        (tmp_path / "arms.yaml").write_text(arms_text)
        args += ["--arms-file", str(tmp_path / "arms.yaml")]
    assert main(Ablation, args) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error: ")
    assert re.search(expected, error), error
    assert "s3cret" not in error
    assert not ray.is_initialized()
    assert not (tmp_path / "out" / "mlflow.db").exists()


def test_existing_sweep_is_not_overwritten(synthetic_dir, tmp_path, capsys):
    (tmp_path / "out" / "taken").mkdir(parents=True)
    (tmp_path / "out" / "taken" / "sweep.json").write_text("{}")
    assert main(Search, ["--data", str(synthetic_dir), "--out", str(tmp_path / "out"), "--name", "taken"]) == 2
    assert "--resume taken continues it, --overwrite replaces it" in capsys.readouterr().err
    assert not ray.is_initialized()


# --- what a user reads: next steps that run as pasted, no noise -------------------------------------------------

def fresh_shell(command_line: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """A pasted line in a new shell: no environment activated, none of the sweep's variables, another folder."""
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(cwd)), "MPLCONFIGDIR": str(cwd / "mpl")}
    return subprocess.run(["bash", "-c", command_line], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_printed_next_steps_run_as_pasted_in_a_fresh_shell(ablation, tmp_path):
    """Runs last on the ablation: its report logs on the sweep's parent run."""
    _, done = ablation
    lines = done.stdout.splitlines()
    report = next(line.strip() for line in lines if "dashboards/ablation_report.py --sweep" in line)
    ui = lines[lines.index("MLflow experiment 'abl'; browse it with:") + 1].strip()
    assert "<" not in report and "--sweep abl " in report

    reported = fresh_shell(report, tmp_path, SWEEP_TIMEOUT_S)
    assert reported.returncode == 0, reported.stderr[-3000:]
    assert "age_sex" in reported.stdout and (tmp_path / "reports" / "abl" / "effects.csv").is_file()

    words = shlex.split(ui)            # this environment's mlflow (runs from a fresh shell), bound to localhost
    assert os.access(words[0], os.X_OK) and words[words.index("--host") + 1] == "127.0.0.1"
    helped = fresh_shell(shlex.join([*words[:words.index("ui") + 1], "--help"]), tmp_path, 300)
    assert helped.returncode == 0 and "--backend-store-uri" in helped.stdout, helped.stderr[-3000:]


def test_sweep_output_has_no_ray_session_paths_or_token_warning(ablation):
    _, done = ablation
    assert "Result logdir:" not in done.stdout and "Token authentication" not in done.stderr
    assert "== Status ==" in done.stdout          # Tune's progress table is kept
