"""ablation_report end to end against a real SQLite MLflow store laid out as sweeps/ writes it: files written and
logged on the parent run, verdicts right on planted effects, the same table from prediction files (--predictions)
as from MLflow; the planner; a search sweep's importance and re-run command."""
import contextlib
import dataclasses
import io
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from dashboards import ablation_report, plan_sweep
from dashboards.effects import HELPS, HURTS, MEAN, NOT_ESTIMABLE, PRIMARY, SECONDARY
from dashboards.evidence import config_evidence
from dashboards.mlflow_store import PARENT_RUN_TAG
from dashboards.simulate import simulate_metadata, simulate_sweep
from dashboards.sweep_reader import PREDICTIONS_FILE, THRESHOLDS_FILE, open_sweep
from search_spaces import OPTUNA_SPACE_FILE, load_arms, load_optuna_space
from sweeps.tracking import SweepRun
from trainable.config import TrialConfig
from trainable.errors import UserError
from trainable.findings import FINDINGS
from trainable.metric_names import DEVICE_HOURS, FLOPS_PER_IMAGE, PARAM_COUNT, PEAK_RSS_MB, TRAIN_FLOPS

REPO = Path(__file__).resolve().parents[1]
ARMS = {"baseline": "baseline", "effusion_up": "loss", "cardiomegaly_down": "optimizer", "twin": "augmentation"}
# training FLOPs of each arm's trials: effusion_up costs 1.5x the baseline, cardiomegaly_down half
TRAIN_FLOPS_BY_ARM = {"baseline": 1e12, "effusion_up": 1.5e12, "cardiomegaly_down": 0.5e12, "twin": 1e12}
# the search's data options, as its parent run records its arguments (every one away from its default)
SEARCH_DATA = {"data": "/data/nih x", "split": "patient", "val_fraction": 0.3, "test_fraction": 0.25, "split_seed": 7,
               "view": "PA", "max_images": 500, "skip_missing": True}


def flat_config(**overrides) -> dict:
    """The flat TrialConfig as a child run's params, without building one (that would import torch and timm)."""
    return {**{f.name: f.default for f in dataclasses.fields(TrialConfig)}, **overrides}


def child_run(client, sweep: SweepRun, name: str, tags: dict, config: dict, metrics: dict, *,
              status: str = "FINISHED", files: dict | None = None, epoch_one: dict | None = None) -> str:
    """A trial's child run as sweeps/mlflow_logger.py writes it (`epoch_one`: values that differ at epoch 1)."""
    run_id = client.create_run(sweep.experiment_id, run_name=name,
                               tags={**tags, PARENT_RUN_TAG: sweep.parent_run_id}).info.run_id
    by_epoch = {1: {**metrics, **(epoch_one or {})}, 2: metrics}
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in config.items()],
                     metrics=[Metric(k, v, 0, epoch) for epoch in (1, 2) for k, v in by_epoch[epoch].items()])
    for path in (files or {}).values():
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status=status)
    return run_id


def write_predictions(folder: Path, trial) -> dict:
    """val_predictions.npz and thresholds.json exactly as trainable.train writes them into a checkpoint."""
    folder.mkdir(parents=True)
    np.savez_compressed(folder / PREDICTIONS_FILE, images=trial.images, labels=trial.labels, probs=trial.probs,
                        findings=np.array(FINDINGS))
    (folder / THRESHOLDS_FILE).write_text(json.dumps(dict(zip(FINDINGS, map(float, trial.thresholds)))))
    return {"npz": folder / PREDICTIONS_FILE, "thresholds": folder / THRESHOLDS_FILE}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{(root / 'mlflow.db').as_posix()}"
    client = MlflowClient(uri)
    artifacts = (root / "mlartifacts").as_uri()

    # an ablation: Effusion helped, Cardiomegaly hurt, one arm identical to the baseline; one trial failed
    signals = {arm: np.ones(len(FINDINGS)) for arm in ARMS}
    signals["effusion_up"][FINDINGS.index("Effusion")] += 1.5
    signals["cardiomegaly_down"][FINDINGS.index("Cardiomegaly")] -= 1.5
    simulated = simulate_sweep(signals, n_seeds=3, n_images=1500, prevalence_floor=0.05, seed=21)
    ablation = SweepRun.start(client, "ablation-test", artifact_root=artifacts,
                              params={"epochs": 2, "seeds": 3, "cpus_per_trial": 1.0, "gpus_per_trial": 0.0},
                              tags={"kind": "ablation", "data": "SYNTHETIC", "data_fingerprint": "f00"})
    for arm, trials in simulated.items():
        for seed, trial in enumerate(trials):
            files = write_predictions(root / f"{arm}-s{seed}", trial)
            flops = TRAIN_FLOPS_BY_ARM[arm]
            child_run(client, ablation, f"{arm}-s{seed}",
                      {"kind": "ablation", "trial_id": f"{arm}{seed}", "seed": str(seed), "arm": arm,
                       "factor": ARMS[arm]}, flat_config(seed=seed, epochs=2),
                      {"val_auc_mean": 0.8, "epoch_seconds": 30.0 + seed, PARAM_COUNT: 1000.0 + seed,
                       FLOPS_PER_IMAGE: flops / 2e4, TRAIN_FLOPS: flops, DEVICE_HOURS: (60 + seed) / 3600,
                       PEAK_RSS_MB: 500.0}, files=files,
                      # the baseline gains 0.10 from its second epoch: what the compute of one epoch buys it
                      epoch_one={"val_auc_mean": 0.7, TRAIN_FLOPS: flops / 2})
    child_run(client, ablation, "broken-s0", {"kind": "ablation", "trial_id": "b0", "seed": "0", "arm": "broken",
                                              "factor": "loss"}, flat_config(epochs=2), {}, status="FAILED")

    # a search: lr near 3e-4 and focal loss are better; some trials pruned by ASHA, one failed
    search = SweepRun.start(client, "search-test", artifact_root=artifacts,
                            params={"epochs": 3, "space_file": str(OPTUNA_SPACE_FILE), "set": "['image_size=64']",
                                    **SEARCH_DATA},
                            tags={"kind": "search", "data": "SYNTHETIC"})
    space = load_optuna_space(OPTUNA_SPACE_FILE)
    rng = np.random.default_rng(3)
    for index in range(40):
        chosen = {}
        for param in space.params:
            if not param.applies(chosen):
                continue
            if param.choices is not None:
                chosen[param.name] = param.choices[rng.integers(len(param.choices))]
            elif param.log:
                chosen[param.name] = float(np.exp(rng.uniform(np.log(param.low), np.log(param.high))))
            else:
                chosen[param.name] = type(param.low)(rng.uniform(param.low, param.high))
        value = (0.75 + 0.05 * (chosen["loss"] == "focal") - 0.03 * abs(np.log10(chosen["lr"] / 3e-4))
                 + rng.normal(0, 0.003))
        metrics = {"val_auc_mean": value, **{f"val_auc_{f}": value + rng.normal(0, 0.01) for f in FINDINGS}}
        pruned, failed = index % 5 == 4, index == 7
        child_run(client, search, f"trial-{index:05d}", {"kind": "search", "trial_id": f"s{index}", "seed": "0",
                                                          **({"pruned": "true"} if pruned else {})},
                  flat_config(image_size=64, epochs=3, **chosen), metrics,
                  status="FAILED" if failed else "KILLED" if pruned else "FINISHED")
    return {"uri": uri, "client": client, "ablation": ablation, "search": search, "root": root,
            "simulated": simulated}


@pytest.fixture(scope="module")
def ablation_out(store, tmp_path_factory):
    """The ablation's report, made once (and logged on its parent run): (folder, what it printed)."""
    out = tmp_path_factory.mktemp("ablation") / "report"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = ablation_report.main(["--sweep", "ablation-test", "--mlflow-uri", store["uri"], "--out", str(out),
                                   "--n-boot", "200"])
    assert rc == 0
    return out, printed.getvalue()


def test_ablation_report_writes_logs_and_gets_planted_effects_right(store, ablation_out):
    out, printed = ablation_out
    expected = {"effects.csv", "forest_mean_auc.png", "heatmap_auc.png", "heatmap_f1.png", "ablation_report.html",
                "cost.csv", "cost_vs_effect.png"}
    assert expected <= {p.name for p in out.iterdir()}
    logged = store["client"].list_artifacts(store["ablation"].parent_run_id, "ablation_report")
    assert expected <= {Path(a.path).name for a in logged}

    effects = pd.read_csv(out / "effects.csv").set_index(["arm", "finding", "metric"])
    assert effects.loc[("effusion_up", "Effusion", "auc"), "verdict"] == HELPS
    assert effects.loc[("cardiomegaly_down", "Cardiomegaly", "auc"), "verdict"] == HURTS
    assert effects.loc[("twin", MEAN, "auc"), "verdict"] not in (HELPS, HURTS, NOT_ESTIMABLE)
    assert effects.loc[("effusion_up", MEAN, "auc"), "factor"] == "loss"
    assert effects.loc[("effusion_up", MEAN, "auc"), "family"] == PRIMARY
    assert effects.loc[("effusion_up", "Effusion", "auc"), "family"] == SECONDARY
    assert set(effects.index.get_level_values("arm")) == {"effusion_up", "cardiomegaly_down", "twin"}
    assert (effects["n_seeds"] == 3).all() and (effects["n_images"] == 1500).all()
    assert {"p_value", "p_adjusted", "mde", "seeds_to_decide", "ci_low", "ci_high"} <= set(effects.columns)

    page = (out / "ablation_report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4 and "http" not in page.split("<body>")[1]
    assert "broken-s0: did not finish" in page and "broken-s0: did not finish" in printed
    assert "effusion_up" in printed and "Effusion AUC" in printed
    # the header names the baseline once, the margin, the families and their methods
    assert "baseline baseline" not in printed and "baseline baseline" not in page
    assert "margin ±0.005" in printed and "Holm" in printed and "Benjamini–Hochberg" in printed

    # what final training (sweeps/train_best.py) says when it picks an arm: the report's verdict on its mean AUC
    sweep = open_sweep(store["client"], "ablation-test")
    named = config_evidence(store["client"], sweep, ["effusion_up", "twin", "baseline"])
    for arm, text in zip(["effusion_up", "twin"], named):
        row = effects.loc[(arm, MEAN, "auc")]
        assert text == (f"arm {arm}: {row['verdict']} on mean AUC in the ablation report (Δ {row['delta']:+.4f} "
                        f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}])")
    assert named[2].startswith("the baseline arm")
    search = open_sweep(store["client"], "search-test")
    assert config_evidence(store["client"], search, ["trial-00001"])[0].startswith("search best, not confirmed")


def test_cost_table_sets_each_gain_against_what_the_same_compute_buys_the_baseline(ablation_out):
    out, printed = ablation_out
    cost = pd.read_csv(out / "cost.csv").set_index("arm")
    effects = pd.read_csv(out / "effects.csv").set_index(["arm", "finding", "metric"])
    assert list(cost.index) == ["baseline", "effusion_up", "cardiomegaly_down", "twin"]
    # medians over the 3 seeds of what the child runs logged
    assert cost.loc["baseline", PARAM_COUNT] == 1001.0 and cost.loc["baseline", PEAK_RSS_MB] == 500.0
    assert cost.loc["twin", DEVICE_HOURS] == pytest.approx(61 / 3600)
    assert cost.loc["effusion_up", "compute_vs_baseline"] == pytest.approx(1.5)
    for arm in ("effusion_up", "cardiomegaly_down", "twin"):
        assert cost.loc[arm, "delta_mean_auc"] == pytest.approx(effects.loc[(arm, MEAN, "auc"), "delta"])
    # 1.5x compute = 3 baseline epochs of a 2-epoch run: the gain of its last 1 epoch (0.10), extrapolated
    assert cost.loc["effusion_up", "compute_matched_gain"] == pytest.approx(0.10)
    assert cost.loc["effusion_up", "baseline_at_compute"].startswith("extrapolated")
    assert bool(cost.loc["effusion_up", "within_compute_gain"]) is True
    # half the compute = the baseline at epoch 1, 0.10 worse: the arm does better than that
    assert cost.loc["cardiomegaly_down", "compute_matched_gain"] == pytest.approx(-0.10)
    assert cost.loc["cardiomegaly_down", "baseline_at_compute"].startswith("measured")
    assert bool(cost.loc["cardiomegaly_down", "within_compute_gain"]) is False
    assert "effusion_up" in printed.split("cost (median")[1].split("WITHIN COMPUTE GAIN")[0]
    assert (out / "cost_vs_effect.png").stat().st_size > 10_000
    # cost is never an effect row
    assert not set(effects.index.get_level_values("finding")) & {PARAM_COUNT, TRAIN_FLOPS, DEVICE_HOURS}


def write_prediction_files(folder: Path, simulated: dict) -> Path:
    """The --predictions format, written by hand: DIR/<arm>/seed<k>.csv with image, patient, label_F, prob_F."""
    for arm, trials in simulated.items():
        (folder / arm).mkdir(parents=True)
        for seed, trial in enumerate(trials):
            columns = {"image": trial.images, "patient": [name.split("_")[0] for name in trial.images]}
            for k, finding in enumerate(FINDINGS):
                columns[f"label_{finding}"] = trial.labels[:, k].astype(int)
                columns[f"prob_{finding}"] = trial.probs[:, k]
            frame = pd.DataFrame(columns).sample(frac=1.0, random_state=seed)      # any row order
            frame.to_csv(folder / arm / f"seed{seed}.csv", index=False)
    return folder


def test_predictions_give_the_same_table_as_the_mlflow_path(store, tmp_path, capsys):
    from_mlflow, from_files = tmp_path / "mlflow", tmp_path / "files"
    args = ["--n-boot", "100", "--no-log"]
    assert ablation_report.main(["--sweep", "ablation-test", "--mlflow-uri", store["uri"], "--out", str(from_mlflow),
                                 *args]) == 0
    folder = write_prediction_files(tmp_path / "predictions", store["simulated"])
    assert ablation_report.main(["--predictions", str(folder), "--out", str(from_files), *args]) == 0
    printed = capsys.readouterr().out
    key = ["arm", "finding", "metric"]
    expected = pd.read_csv(from_mlflow / "effects.csv").drop(columns=["factor"]).sort_values(key, ignore_index=True)
    got = pd.read_csv(from_files / "effects.csv").drop(columns=["factor"]).sort_values(key, ignore_index=True)
    pd.testing.assert_frame_equal(got, expected)
    assert {"effects.csv", "forest_mean_auc.png", "heatmap_auc.png", "ablation_report.html"} <= \
        {p.name for p in from_files.iterdir()}
    assert "chosen on each file's own labels" in printed

    # a thresholds.json beside an arm's files is used for its F1, and the report says so
    thresholds = dict(zip(FINDINGS, [0.5] * len(FINDINGS)))
    (folder / "twin" / "thresholds.json").write_text(json.dumps(thresholds))
    assert ablation_report.main(["--predictions", str(folder), "--out", str(tmp_path / "t"), *args]) == 0
    assert "twin: twin/thresholds.json" in capsys.readouterr().out
    with_file = pd.read_csv(tmp_path / "t" / "effects.csv").set_index(key)
    twin = store["simulated"]["twin"][0]
    effusion = FINDINGS.index("Effusion")
    assert with_file.loc[("twin", "Effusion", "f1"), "arm_value"] != expected.set_index(key).loc[
        ("twin", "Effusion", "f1"), "arm_value"]
    assert np.isfinite(with_file.loc[("twin", "Effusion", "f1"), "arm_value"]) and twin.labels[:, effusion].any()


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.drop(columns=["label_Hernia"]), r"twin/seed1\.csv: missing column label_Hernia"),
    (lambda f: f.assign(prob_Mass=f["prob_Mass"] + 2), r"twin/seed1\.csv: column prob_Mass holds .* expected a "
                                                      r"probability in 0\.\.1"),
    (lambda f: f.assign(label_Edema=2), r"twin/seed1\.csv: column label_Edema holds 2 .* expected 0 or 1"),
    (lambda f: f.iloc[1:], r"twin/seed1\.csv: column image differs from the first file's images"),
])
def test_bad_prediction_files_fail_in_one_line_naming_file_and_column(store, tmp_path, capsys, damage, message):
    folder = write_prediction_files(tmp_path / "predictions", {k: v[:2] for k, v in store["simulated"].items()})
    path = folder / "twin" / "seed1.csv"
    damage(pd.read_csv(path)).to_csv(path, index=False)
    assert ablation_report.main(["--predictions", str(folder), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error
    assert __import__("re").search(message, error), error
    assert not (tmp_path / "out" / "effects.csv").exists()


def test_plan_sweep_prints_seeds_trials_and_compute_from_the_pilot(store, capsys):
    assert plan_sweep.main(["--from-sweep", "ablation-test", "--mlflow-uri", store["uri"], "--detect", "0.01",
                            "--n-boot", "100"]) == 0
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line for line in printed.splitlines() if line.startswith("  ") and "pooled" in line}
    assert set(rows) == {"effusion_up", "cardiomegaly_down", "twin"}
    planned = printed[printed.index("planned sweep:"):]
    trials = int(planned.split(" trials")[0].rsplit(" ", 1)[-1])
    seeds = [int(line.split()[4]) for line in rows.values()]
    assert trials == sum(seeds) + max(seeds)
    # 3 pilot trials per arm report epoch_seconds 30, 31, 32: median 31 s, 2 epochs, 1 CPU each
    assert f"{trials} trials × 2 epochs × 31.0 s/epoch" in printed
    assert f"= {trials * 2 * 31.0 / 3600:.2f} CPU-hours" in printed
    assert plan_sweep.main(["--from-sweep", "ablation-test", "--mlflow-uri", store["uri"], "--detect", "2"]) == 2
    assert "--detect 2.0: expected" in capsys.readouterr().err


def test_sweep_found_by_parent_run_id_and_bad_input_is_one_line(store, tmp_path, capsys):
    from dashboards.mlflow_store import connect
    parent = store["ablation"].parent_run_id
    sweep = open_sweep(connect(store["uri"], create=False), parent)
    assert sweep.kind == "ablation" and sweep.experiment_name == "ablation-test" and len(sweep.trials) == 13

    child = next(t.run_id for t in sweep.trials if t.name == "twin-s0")
    for args, message in ((["--sweep", "no-such-sweep"], "no parent run id or experiment of that name"),
                          (["--sweep", child], "that is a trial's run"),
                          (["--sweep", "x", "--mlflow-uri", f"sqlite:///{(tmp_path / 'none.db').as_posix()}"],
                           "no such SQLite file"),
                          (["--sweep", "ablation-test", "--baseline", "control"], "baseline arm 'control'")):
        uri = [] if "--mlflow-uri" in args else ["--mlflow-uri", store["uri"]]
        assert ablation_report.main([*args, *uri, "--out", str(tmp_path / "x"), "--no-log"]) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and "\n" not in error
    assert ablation_report.main(["--predictions", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_readers_of_sweeps_skip_final_training_runs_by_their_run_type(tmp_path):
    """A final training's run (run_type=final) beside a sweep's parent run in one experiment: open_sweep reads the
    sweep, however much later the final run started, and refuses the final run by id, naming its run type."""
    from dashboards.mlflow_store import FINAL_RUN, RUN_TYPE_TAG, SWEEP_RUN, connect
    from sweeps.final.track import FinalRun
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    client = connect(uri)
    sweep = SweepRun.start(client, "shared", artifact_root=None, params={"seeds": 1}, tags={"kind": "ablation"})
    client.create_run(sweep.experiment_id, run_name="baseline-s0", tags={PARENT_RUN_TAG: sweep.parent_run_id,
                                                                         "arm": "baseline", "seed": "0"})
    final = FinalRun.start(client, uri, experiment="shared", run_name="final-1", artifact_root=None,
                           params={"seeds": 1}, tags={"kind": "final"})
    assert final.experiment_id == sweep.experiment_id
    assert client.get_run(sweep.parent_run_id).data.tags[RUN_TYPE_TAG] == SWEEP_RUN
    assert client.get_run(final.parent_run_id).data.tags[RUN_TYPE_TAG] == FINAL_RUN
    assert client.get_run(final.parent_run_id).info.run_name == "final-1"

    found = open_sweep(client, "shared")
    assert found.parent_run_id == sweep.parent_run_id and found.notes == [] and \
        [t.name for t in found.trials] == ["baseline-s0"]
    with pytest.raises(UserError, match=f"that is a final training's run \\({RUN_TYPE_TAG}={FINAL_RUN}\\)"):
        open_sweep(client, final.parent_run_id)
    FinalRun.start(client, uri, experiment="finals-only", run_name="final-2", artifact_root=None, params={}, tags={})
    with pytest.raises(UserError, match=r"experiment has only final training runs \(1, run_type=final\)"):
        open_sweep(client, "finals-only")


def test_search_report_importance_direction_and_rerun_command(store, tmp_path, capsys):
    out = tmp_path / "search"
    assert ablation_report.main(["--sweep", "search-test", "--mlflow-uri", store["uri"], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "31 ran the full budget, 8 stopped early by ASHA" in printed
    assert "converges fast" in printed
    command = next(line.strip() for line in printed.splitlines() if "sweeps/run_ablation.py" in line)
    assert "--arms baseline,search_top1,search_top2,search_top3 --seeds 3 --epochs 3" in command
    assert "--set image_size=64" in command
    # runs as pasted: this interpreter, the script by its path; the re-run scores on the search's own split
    from sweeps.ablation import Ablation
    from sweeps.options import build_parser
    from trainable.__main__ import data_spec
    from trainable.data.nih import DataSpec
    words = shlex.split(command)
    assert words[0] == sys.executable and Path(words[1]) == REPO / "sweeps" / "run_ablation.py"
    parser = build_parser("run_ablation.py", "")
    Ablation.add_arguments(parser)
    rerun = parser.parse_args(words[2:])
    assert data_spec(rerun) == DataSpec(data_dir=SEARCH_DATA["data"], **{k: v for k, v in SEARCH_DATA.items()
                                                                         if k != "data"})
    assert Path(rerun.arms_file) == out / "rerun_top_configs.yaml"

    importance = pd.read_csv(out / "importance.csv")
    mean = importance[importance["target"] == MEAN].set_index("param")
    assert mean["importance"].sum() == pytest.approx(1.0) and "focal_gamma" in mean.index   # conditional: kept
    assert mean.loc["lr", "importance"] > mean["importance"].median()
    assert mean["above_noise"].notna().all() and not mean["above_noise"].all()
    assert {MEAN, "Hernia"} <= set(importance["target"])
    lr = pd.read_csv(out / "factor_directions.csv").query("param == 'lr'")
    assert list(lr["group"].str.split().str[0]) == ["low", "mid", "high"]
    assert lr["mean_val_auc"].idxmax() == lr.index[1]        # the middle tertile holds lr = 3e-4
    directions = pd.read_csv(out / "factor_directions.csv")
    focal = directions[(directions["param"] == "loss") & (directions["group"] == "focal")]
    assert focal["vs_all_trials"].item() > 0
    assert "(not used)" in set(directions.loc[directions["param"] == "focal_gamma", "group"])

    arms = load_arms(extra=out / "rerun_top_configs.yaml")      # the arms file is valid for run_ablation.py
    assert {"search_top1", "search_top2", "search_top3"} <= set(arms)
    assert "image_size" not in arms["search_top1"].overrides and "seed" not in arms["search_top1"].overrides
    logged = store["client"].list_artifacts(store["search"].parent_run_id, "search_report")
    assert {"search_report.html", "importance.csv", "rerun_top_configs.yaml"} <= {Path(a.path).name for a in logged}


def test_runs_as_a_script_from_the_repo_root():
    done = subprocess.run([sys.executable, "dashboards/ablation_report.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "--sweep" in done.stdout and "--mlflow-uri" in done.stdout


def test_reading_a_sweep_needs_no_torch():
    # the report reader takes the checkpoint file names from a torch-free module, not from trainable.train
    done = subprocess.run([sys.executable, "-c", "import sys, dashboards.sweep_reader; "
                           "sys.exit('torch' in sys.modules)"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_shortcut_table_scores_metadata_and_chance_beside_the_image_model(store):
    from sklearn.metrics import roc_auc_score
    from dashboards.shortcuts import shortcut_table
    from dashboards.effects import TrialPredictions
    arms = {arm: store["simulated"][arm] for arm in ("baseline", "twin")}
    base = arms["baseline"][0]
    rng = np.random.default_rng(4)
    probs = rng.random(base.labels.shape).astype(np.float32)        # metadata knows nothing ...
    hernia = FINDINGS.index("Hernia")
    probs[:, hernia] = np.clip(base.labels[:, hernia] * 0.6 + rng.random(len(probs)) * 0.5, 0, 1)  # ... but Hernia
    order = rng.permutation(len(probs))                             # any row order: aligned by image name
    metadata = TrialPredictions(base.labels[order], probs[order], np.full(14, 0.5), base.images[order], "metadata")
    table = shortcut_table(arms, "baseline", metadata, n_boot=200).set_index("finding")
    for k, finding in enumerate(FINDINGS):
        assert table.loc[finding, "metadata_auc"] == pytest.approx(roc_auc_score(base.labels[:, k], probs[:, k]))
        assert table.loc[finding, "image_auc"] == pytest.approx(
            np.mean([roc_auc_score(t.labels[:, k], t.probs[:, k]) for t in arms["baseline"]]))
        assert table.loc[finding, "auc_twin"] == pytest.approx(
            np.mean([roc_auc_score(t.labels[:, k], t.probs[:, k]) for t in arms["twin"]]))
    assert table.loc["Hernia", "metadata_auc"] > table.loc["Hernia", "image_auc"]
    assert table.loc["Hernia", "flag"] == "metadata alone does as well or better"
    others = table.drop(index="Hernia")
    assert others["clearly_beats_metadata"].all() and (others["flag"] == "").all()
    assert ((table["shuffled_auc"] - 0.5).abs() < 0.03).all() and (table["shuffled_auc_95"] < table["image_auc"]).all()
    # the floor's rank-sum AUC is sklearn's: one permutation scored both ways
    from dashboards.shortcuts import shuffled_floor
    one = TrialPredictions(base.labels, base.probs, base.thresholds, base.images)
    floor, _ = shuffled_floor(one, shuffles=1, seed=9)
    permuted = base.labels[np.random.default_rng(9).permutation(len(base.labels))]
    assert floor == pytest.approx([roc_auc_score(permuted[:, k], base.probs[:, k]) for k in range(14)])


def test_subgroup_gaps_find_a_planted_gap_and_none_in_an_identical_arm(store, tmp_path):
    from dashboards.effects import TrialPredictions
    from dashboards.subgroup_gaps import gap_section, metric_frame, subgroups
    baseline = store["simulated"]["baseline"]
    metadata = simulate_metadata(baseline[0].images)
    female = (metadata["sex"] == "F").to_numpy()
    # worse for F only; the same noise for every seed, so the arm's seeds spread like the baseline's
    noise = np.random.default_rng(5).random((int(female.sum()), len(FINDINGS)))

    def blurred_for_women(trial):
        probs = trial.probs.copy()
        probs[female] = 0.5 * probs[female] + 0.5 * noise
        return TrialPredictions(trial.labels, probs, trial.thresholds, trial.images, trial.name + "-f")
    arms = {"baseline": baseline, "twin": store["simulated"]["twin"],
            "worse_for_women": [blurred_for_women(t) for t in baseline]}
    section = gap_section(arms, "baseline", metadata, n_boot=200)
    values = section.tables["subgroup_values.csv"]
    rows = section.tables["subgroup_gaps.csv"].set_index(["arm", "attribute", "metric"])
    planted = rows.loc[("worse_for_women", "sex", "mean_auc")]
    assert planted["verdict"] == "widens" and planted["ci_low"] > 0 and planted["p_adjusted"] <= 0.05
    assert not rows.loc["twin"]["verdict"].isin(["widens", "narrows"]).any()
    assert set(rows.index.get_level_values("attribute")) == {"sex", "age", "view"}
    # the bootstrap's point gaps equal fairlearn MetricFrame's per-group values (sklearn metrics)
    groups = subgroups(metadata)
    for attribute in ("sex", "age"):
        kept = sorted(values.loc[values["attribute"] == attribute, "group"].unique())
        gaps = [metric_frame(t, groups[attribute], kept) for t in baseline]
        for metric in ("mean_auc", "underdiagnosis"):
            expected = np.mean([g[metric].max() - g[metric].min() for g in gaps])
            assert rows.loc[("twin", attribute, metric), "baseline_gap"] == pytest.approx(expected, abs=1e-9)
    assert "unknown" not in set(values["group"])                # unknown ages are never a group
    assert "subgroup_gaps.png" in section.figures and any("WIDENS" in line for line in section.summary)


def test_subgroup_gaps_say_so_when_no_attribute_has_two_groups_big_enough(store):
    from dashboards.subgroup_gaps import gap_section
    baseline = store["simulated"]["baseline"]
    metadata = simulate_metadata(baseline[0].images).assign(sex="M", view="PA", age=float("nan"))   # one group each
    section = gap_section({"baseline": baseline, "twin": store["simulated"]["twin"]}, "baseline", metadata, n_boot=20)
    assert section.tables == {} and section.figures == {}
    assert section.summary == ("subgroup gaps: too few images per group",)
