"""Bad input through the user-facing CLIs: `python -m trainable` (trainable.__main__.main) and the sweep CLIs
(sweeps/run_ablation.py = sweeps.runner.main(Ablation, argv)), run in process.

Every refusal: exit code 2, one `error: ...` line naming the file/key/value at fault and what was expected,
nothing half-written in --out, and for everything a sweep can check without a cluster, Ray never started (the
sweep tests replace sweeps.runner.start_ray with a tripwire, so a check that comes too late fails fast here
instead of running trials).

The module-level checks behind these are tested in tests/test_nih.py (CSV, ages, findings, lists, splits),
tests/test_cache.py (bad PNG files, 16-bit/RGBA decoding), tests/test_config.py (keys, registries, ranges),
tests/test_models.py (weights files), tests/test_sweeps.py (arms file errors, unreachable MLflow with a password
in the URI, an existing sweep name) and tests/test_sweeps_cluster.py (--gpus-per-trial on a two-node cluster);
here they are checked once more where the user meets them, at the CLI.
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import ray
import timm
import torch
from mlflow import MlflowClient

import sweeps.runner as runner
from dashboards.mlflow_store import mask_secrets
from sweeps.ablation import Ablation
from sweeps.tracking import ui_command
from trainable.__main__ import main as trial_main
from trainable.config import TrialConfig
from trainable.data.synthetic import generate
from trainable.findings import FINDINGS

REPO = Path(__file__).resolve().parents[1]
CSV = "Data_Entry_2017_v2020.csv"
SECRET = "s3cret"
TINY_SET = ["--set", "backbone=test_resnet", "--set", "pretrained=none", "--set", "image_size=32",
            "--set", "batch_size=16"]
TRIAL_ARGS = [*TINY_SET, "--set", "epochs=1"]
SWEEP_ARGS = [*TINY_SET, "--epochs", "1", "--arms", "baseline", "--seeds", "1", "--cpus-per-trial", "1"]


# --- shared fixtures ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clean(synthetic_dir) -> Path:
    """conftest's small valid NIH-layout data set (v2020 CSV); tests corrupt copies of it, never this one."""
    return synthetic_dir


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def sweep_out(tmp_path_factory) -> Path:
    """One --out for the in-process sweeps (one embedded MLflow store); each test uses its own --name."""
    return tmp_path_factory.mktemp("sweeps")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, cache_dir):
    """No cluster or tracking server from the caller's shell; a private image cache; the environment and
    MLflow's global tracking URI restored afterwards (the runner sets both)."""
    saved_environ = dict(os.environ)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CXR_CACHE_DIR", str(cache_dir))
    monkeypatch.setattr(mlflow, "set_tracking_uri", lambda uri: None)   # the runner's only global MLflow setting
    yield
    os.environ.clear()
    os.environ.update(saved_environ)
    assert not ray.is_initialized()


class RayStarted(AssertionError):
    """Raised by the tripwire when a sweep gets as far as starting Ray."""


@pytest.fixture
def no_ray(monkeypatch):
    """Bad input must be refused before Ray starts: starting it fails the test at once."""
    def tripwire(address):
        raise RayStarted("the sweep started Ray before refusing the bad input")
    monkeypatch.setattr(runner, "start_ray", tripwire)


def error_line(captured: str) -> str:
    """The one `error: ...` line (progress bars may share stderr)."""
    lines = re.findall(r"^error: .*$", captured, flags=re.MULTILINE)
    assert len(lines) == 1, captured
    return lines[0]


def run_trial(data: Path, out: Path, *extra: str) -> int:
    return trial_main(["--data", str(data), "--out", str(out), *TRIAL_ARGS, *extra])


def run_sweep(data: Path, out: Path, name: str, *extra: str) -> int:
    return runner.main(Ablation, ["--data", str(data), "--out", str(out), "--name", name, *SWEEP_ARGS, *extra])


def sweep_left_nothing(out: Path, name: str) -> None:
    """No sweep record, no Tune state, no MLflow runs for this sweep name."""
    assert not (out / name / "sweep.json").exists() and not (out / name / "tuner.pkl").exists()
    if (out / "mlflow.db").exists():
        client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
        experiment = client.get_experiment_by_name(name)
        assert experiment is None or client.search_runs([experiment.experiment_id]) == []


# --- corrupt data sets ------------------------------------------------------------------------------------------

def _edit_csv(data: Path, change) -> None:
    frame = pd.read_csv(data / CSV, dtype=str, keep_default_na=False)
    change(frame)
    frame.to_csv(data / CSV, index=False)


def _image(data: Path, index: int = 0) -> Path:
    return sorted((data / "images").iterdir())[index]


def _set_cell(column: str, value: str):
    def change(data: Path):
        _edit_csv(data, lambda frame: frame.__setitem__(column, [value, *frame[column][1:]]))
        return [], rf"{CSV}: column '{column}' has 1 bad row\(s\), first at image {_image(data).name}: '{value}'; " \
                   rf"expected "
    return change


def _missing_folder(data):
    shutil.rmtree(data)
    return [], rf"{re.escape(str(data))}: data folder not found; expected the NIH ChestX-ray14 folder"


def _no_csv(data):
    (data / CSV).unlink()
    return [], r": no metadata CSV; expected Data_Entry_2017\.csv or Data_Entry_2017_v2020\.csv"


def _missing_column(data):
    _edit_csv(data, lambda frame: frame.drop(columns="Patient Age", inplace=True))
    return [], rf"{CSV}: missing column\(s\) 'Patient Age'; expected the NIH header with Image Index"


def _unknown_finding(data):
    _edit_csv(data, lambda frame: frame.__setitem__("Finding Labels", ["Pneumonitis", *frame["Finding Labels"][1:]]))
    return [], rf"unknown finding 'Pneumonitis' in 'Finding Labels' of image {_image(data).name} .*expected " \
               r"'No Finding' or '\|'-joined names from: Atelectasis"


def _not_on_disk(data):
    gone = _image(data, 3)
    gone.unlink()
    return [], rf"1 of \d+ images are not on disk, first {gone.name}; expected them under .*--skip-missing drops them"


def _zero_byte(data):
    _image(data).write_bytes(b"")
    return [], rf"{re.escape(str(_image(data)))}: empty file, expected a PNG image"


def _truncated(data):
    path = _image(data)
    path.write_bytes(path.read_bytes()[:120])
    return [], rf"{re.escape(str(path))}: corrupt or truncated PNG"


def _jpeg_renamed(data):
    from PIL import Image
    path = _image(data)
    Image.open(path).convert("L").save(path, format="JPEG")
    return [], rf"{re.escape(str(path))}: not a PNG \(wrong file signature\), expected a PNG image"


def _patient_in_both_lists(data):
    train_val = (data / "train_val_list.txt").read_text().split()
    patients = pd.Series([name.split("_")[0] for name in train_val])
    patient = patients[patients.duplicated()].iloc[0]              # one with several images
    moved = next(name for name in train_val if name.startswith(patient))
    (data / "train_val_list.txt").write_text("".join(f"{n}\n" for n in train_val if n != moved))
    with open(data / "test_list.txt", "a") as lists:
        lists.write(f"{moved}\n")
    return [], rf"patient {int(patient)} has images in both train_val_list\.txt and test_list\.txt .*expected " \
               r"patient-wise lists"


def _semicolon_separated(data):
    frame = pd.read_csv(data / CSV, dtype=str, keep_default_na=False)
    frame.to_csv(data / CSV, index=False, sep=";")
    return [], rf"{CSV}: missing column\(s\) .*\(the header is one column with semicolon-separated names: the file " \
               r"is likely saved with ';' as separator; save it comma-separated\)"


def _data_is_a_file(data):
    csv = data / CSV
    shutil.copyfile(csv, data.with_name(CSV))
    shutil.rmtree(data)
    data.with_name(CSV).rename(data)             # --data now names the CSV itself
    return [], rf"{re.escape(str(data))}: is a file; expected the NIH ChestX-ray14 folder holding Data_Entry_2017\.csv"


def _empty_split_after_filter(data):
    _edit_csv(data, lambda frame: frame.__setitem__("View Position", "PA"))
    return ["--view", "AP"], r"split '\w+' is empty \(0 images after filters split=official, view=AP"


CORRUPTIONS = {
    "missing-folder": _missing_folder,
    "no-csv": _no_csv,
    "missing-column": _missing_column,
    "unknown-finding": _unknown_finding,
    "image-not-on-disk": _not_on_disk,
    "zero-byte-png": _zero_byte,
    "truncated-png": _truncated,
    "jpeg-renamed-png": _jpeg_renamed,
    "patient-in-both-lists": _patient_in_both_lists,
    "empty-split-after-filter": _empty_split_after_filter,
    "age-unparseable": _set_cell("Patient Age", "abc"),
    "semicolon-separated-csv": _semicolon_separated,
    "data-is-a-file": _data_is_a_file,
}
# Only decoding finds these: the trial finds them when it builds its image cache.
IMAGE_CORRUPTIONS = ("zero-byte-png", "truncated-png", "jpeg-renamed-png")


def corrupt(clean: Path, tmp_path: Path, kind: str) -> tuple[Path, list[str], str]:
    data = Path(shutil.copytree(clean, tmp_path / "data"))
    extra, expected = CORRUPTIONS[kind](data)
    return data, extra, expected


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_trial_cli_refuses_bad_data_naming_what_is_wrong(clean, tmp_path, capsys, kind):
    data, extra, expected = corrupt(clean, tmp_path, kind)
    out = tmp_path / "out"
    assert run_trial(data, out, *extra) == 2
    assert re.search(expected, error_line(capsys.readouterr().err))
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    if kind not in IMAGE_CORRUPTIONS:
        assert not out.exists()


@pytest.mark.parametrize("kind", [*IMAGE_CORRUPTIONS, "weights-of-another-backbone", "pickled-object-weights"])
def test_trial_cli_writes_nothing_when_the_trial_cannot_start(clean, tmp_path, weights, kind):
    out = tmp_path / "out"
    if kind in IMAGE_CORRUPTIONS:
        data, extra, _ = corrupt(clean, tmp_path, kind)
    else:
        data, extra = clean, ["--set", f"pretrained={weights[kind]}"]
    assert run_trial(data, out, *extra) == 2
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("kind", [kind for kind in CORRUPTIONS if kind != "truncated-png"])
def test_sweep_cli_refuses_bad_data_before_ray_starts(clean, tmp_path, sweep_out, capsys, no_ray, kind):
    data, extra, expected = corrupt(clean, tmp_path, kind)
    name = f"bad-{kind}"
    assert run_sweep(data, sweep_out, name, *extra) == 2
    assert re.search(expected, error_line(capsys.readouterr().err))
    sweep_left_nothing(sweep_out, name)


# --- images that must work ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def odd_but_valid(tmp_path_factory):
    """8-bit, 16-bit and RGBA PNGs mixed, one listed image missing, --skip-missing, one impossible age (150, as
    the 2017 CSV has a few): (exit code, out, stdout)."""
    root = tmp_path_factory.mktemp("odd")
    data = generate(root / "data", patients=30, image_size=32, seed=1, png_modes=("L", "I;16", "RGBA"))
    missing = _image(data, 5)
    missing.unlink()
    _edit_csv(data, lambda frame: frame.__setitem__("Patient Age", ["150", *frame["Patient Age"][1:]]))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = trial_main(["--data", str(data), "--out", str(root / "out"), *TRIAL_ARGS, "--skip-missing",
                           "--cache-dir", str(root / "cache")])
    return code, root / "out", stdout.getvalue(), missing.name


def test_16_bit_and_rgba_pngs_train_and_skip_missing_drops_the_absent_image(odd_but_valid):
    code, out, _, missing = odd_but_valid
    assert code == 0
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert json.loads((out / "split.json").read_text())["skipped_missing"] == 1
    assert missing not in set(pd.read_csv(out / "split.csv")["image"])


def test_findings_without_validation_positives_are_named_in_one_warning(odd_but_valid):
    _, out, stdout, _ = odd_but_valid
    split = pd.read_csv(out / "split.csv")
    absent = {name: [f for f in FINDINGS if split.loc[split["split"] == name, f].sum() == 0] for name in ("train", "val")}
    assert absent["val"], "the fixture's validation split should lack some finding"
    consequence = {"train": "the model sees no positive example of them",
                   "val": "their validation AUC is undefined and left out of val_auc_mean"}
    warnings = [line for line in stdout.splitlines() if "split has no positive image" in line]
    assert warnings == [f"warning: the {name} split has no positive image of {len(findings)} finding(s), "
                        f"{', '.join(findings)}: {consequence[name]}" for name, findings in absent.items() if findings]


def test_skip_missing_says_how_many_images_it_dropped(odd_but_valid):
    _, _, stdout, _ = odd_but_valid
    assert re.search(r"(skipp|missing|not on disk)[^\n]*\b1\b|\b1\b[^\n]*(skipp|missing|not on disk)", stdout), stdout


def test_an_impossible_age_loads_as_unknown_and_is_reported_in_one_line(odd_but_valid):
    _, out, stdout, _ = odd_but_valid
    assert re.search(r"^1 image\(s\) with an age outside 0-120 years \(first \d+_\d+\.png: '150'\) loaded with the "
                     r"age unknown", stdout, flags=re.MULTILINE), stdout
    assert json.loads((out / "split.json").read_text())["unknown_ages"]["count"] == 1


# --- config -----------------------------------------------------------------------------------------------------

CONFIG_ERRORS = [
    (["--set", "foo=1"], r"--set 'foo=1': unknown config key 'foo'; valid keys: backbone, pretrained, "),
    (["--set", "scheduler=linear"], r"scheduler='linear' is not one of: "),
    (["--set", "lr=0"], r"lr=0\.0 must be > 0"),
    (["--set", "lr=-1e-3"], r"lr=-0\.001 must be > 0"),
    (["--set", "batch_size=0"], r"batch_size=0 must be > 0"),
    (["--set", "batch_size=-8"], r"batch_size=-8 must be > 0"),
    # nan passes every comparison check and inf a lower bound; 100000 px would exhaust memory
    (["--set", "lr=nan"], r"lr=nan must be > 0 and <= 1e\+06"),
    (["--set", "lr=inf"], r"lr=inf must be > 0 and <= 1e\+06"),
    (["--set", "image_size=100000"], r"image_size=100000 must be >= 16 and <= 2048"),
]


@pytest.mark.parametrize("extra, expected", [*CONFIG_ERRORS, (["--set", "epochs=0"], r"epochs=0 must be > 0"),
                                             (["--set", "epochs=-2"], r"epochs=-2 must be > 0"),
                                             (["--set", "seed=1e23"], r"seed=99999999999999991611392 must be >= 0 "
                                                                      r"and <= 4294967295"),
                                             (["--preset", "nope"], r"preset 'nope' is not one of: chexnet_replica")])
def test_trial_cli_refuses_bad_config_before_writing_anything(clean, tmp_path, capsys, extra, expected):
    out = tmp_path / "out"
    assert run_trial(clean, out, *extra) == 2
    assert re.search(expected, error_line(capsys.readouterr().err))
    assert not out.exists()


@pytest.mark.parametrize("extra, expected", CONFIG_ERRORS)
def test_sweep_cli_refuses_bad_config_before_ray_starts(clean, sweep_out, capsys, no_ray, extra, expected):
    assert run_sweep(clean, sweep_out, "bad-config", *extra) == 2
    assert re.search(expected, error_line(capsys.readouterr().err))
    sweep_left_nothing(sweep_out, "bad-config")


@pytest.mark.parametrize("option, value", [("--epochs", "0"), ("--epochs", "-1"), ("--gpus-per-trial", "-1"),
                                           ("--cpus-per-trial", "-0.5"), ("--cpus-per-trial", "nan"),
                                           ("--gpus-per-trial", "inf")])
def test_sweep_cli_refuses_out_of_range_options(clean, sweep_out, capsys, no_ray, option, value):
    with pytest.raises(SystemExit) as exit_:
        run_sweep(clean, sweep_out, "bad-option", option, value)
    assert exit_.value.code == 2
    assert re.search(rf"error: argument {option}: '{re.escape(value)}' must be", capsys.readouterr().err)


@pytest.mark.parametrize("option, value", [("--max-failures", "-3"), ("--max-concurrent", "-1")])
def test_sweep_cli_refuses_negative_counts(clean, sweep_out, capsys, no_ray, option, value):
    with pytest.raises(SystemExit) as exit_:
        run_sweep(clean, sweep_out, "bad-count", option, value)
    assert exit_.value.code == 2 and option in capsys.readouterr().err


def test_more_gpus_per_trial_than_this_machine_has_is_refused_and_nothing_starts(clean, sweep_out, capsys):
    # Needs the cluster's resources, so it is checked right after Ray starts (for real here, a local Ray),
    # before the parent run, the sweep record or any trial.
    assert run_sweep(clean, sweep_out, "gpus", "--gpus-per-trial", "4", "--address", "local") == 2
    assert "--gpus-per-trial 4: no node of this Ray cluster has that many GPUs (largest node: 0" in \
        error_line(capsys.readouterr().err)
    assert not ray.is_initialized()
    sweep_left_nothing(sweep_out, "gpus")


# --- pretrained weights ---------------------------------------------------------------------------------------

class _Pickled:
    """Not a tensor: a weights file holding this must be refused (files load with weights_only=True)."""


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    torch.save(timm.create_model("test_efficientnet").state_dict(), folder / "efficientnet.pth")
    torch.save({"model": _Pickled()}, folder / "pickled.pth")
    torch.save({}, folder / "empty.pth")
    (folder / "random.pth").write_bytes(os.urandom(2048))
    return {"weights-of-another-backbone": folder / "efficientnet.pth",
            "pickled-object-weights": folder / "pickled.pth",
            "empty-state-dict": folder / "empty.pth",
            "random-bytes": folder / "random.pth"}


@pytest.mark.parametrize("kind, expected", [
    ("weights-of-another-backbone",
     r"pretrained='[^']*efficientnet\.pth': weights do not match backbone 'test_resnet'"),
    ("pickled-object-weights", r"pretrained='[^']*pickled\.pth': cannot read weights file .*weights_only"),
    ("empty-state-dict", r"pretrained='[^']*empty\.pth': holds no weights \(an empty state dict\)"),
    ("random-bytes", r"pretrained='[^']*random\.pth': not a weights file"),
])
def test_trial_cli_refuses_unusable_weights(clean, tmp_path, capsys, weights, kind, expected):
    out = tmp_path / "out"
    assert run_trial(clean, out, "--set", f"pretrained={weights[kind]}") == 2
    assert re.search(expected, error_line(capsys.readouterr().err))
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("kind", ["weights-of-another-backbone", "pickled-object-weights", "empty-state-dict",
                                  "random-bytes"])
def test_sweep_cli_refuses_unusable_weights_before_ray_starts(clean, sweep_out, capsys, no_ray, weights, kind):
    assert run_sweep(clean, sweep_out, "bad-weights", "--set", f"pretrained={weights[kind]}") == 2
    assert weights[kind].name in error_line(capsys.readouterr().err)
    sweep_left_nothing(sweep_out, "bad-weights")


def test_imagenet_weights_without_the_hub_stop_the_sweep_before_ray_with_the_fix(clean, sweep_out, capsys, no_ray,
                                                                              monkeypatch, tmp_path):
    """HF_HUB_OFFLINE (huggingface_hub reads the switch at call time) and an empty hub cache: the machine has no
    hub. Every arm's (backbone, imagenet) is checked once on the driver and the sweep stops at once."""
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    started = time.monotonic()
    assert run_sweep(clean, sweep_out, "no-hub", "--set", "pretrained=imagenet", "--arms", "baseline,focal") == 2
    assert time.monotonic() - started < 20
    message = error_line(capsys.readouterr().err)
    assert re.search(r"backbone='test_resnet' pretrained='imagenet': timm/test_resnet\.\S+ \(model\.safetensors or "
                     r"pytorch_model\.bin\) is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; offline, "
                     r"pass a local weights file as pretrained=/path/to/weights\.safetensors, or pretrained=none",
                     message), message
    sweep_left_nothing(sweep_out, "no-hub")


def test_imagenet_weights_with_the_hub_out_of_reach_fail_in_seconds_not_a_minute(clean, tmp_path, capsys,
                                                                                monkeypatch):
    """The trial CLI where the hub endpoint refuses connections (as HF_ENDPOINT at a closed port would make it;
    huggingface_hub builds its URLs from this template) and no weights are cached. Before: ~50 s of download
    retries, then a traceback; now one refused request."""
    import huggingface_hub.constants as hub_constants
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    started = time.monotonic()
    assert run_trial(clean, tmp_path / "out", "--set", "pretrained=imagenet") == 2
    assert time.monotonic() - started < 10
    captured = capsys.readouterr()
    message = error_line(captured.err)
    assert re.search(r"cannot reach the Hugging Face hub for timm/test_resnet\.\S+ \(.*Connection refused\) and "
                     r"the weights are not in the local cache; offline, pass a local weights file .*, or "
                     r"pretrained=none", message), message
    assert "Retrying" not in captured.err and not (tmp_path / "out").exists()      # one probe, no retry loop


# --- resuming a trial from a checkpoint -----------------------------------------------------------------------

def _fake_run(out: Path, state: dict | None) -> Path:
    """An earlier trial's --out with one metrics line and checkpoints/epoch_001/state.pt holding `state`."""
    checkpoint = out / "checkpoints" / "epoch_001"
    checkpoint.mkdir(parents=True)
    (out / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_auc_mean": 0.5}) + "\n")
    if state is not None:
        torch.save(state, checkpoint / "state.pt")
    return checkpoint


PROGRESS = {"next_epoch": 2, "best_auc": 0.5, "best_epoch": 1, "epochs_without_gain": 0}
TINY_CONFIG = TrialConfig(backbone="test_resnet", pretrained="none", image_size=32, batch_size=16, epochs=1)


def test_resume_with_a_cut_short_metrics_line_is_refused_naming_the_line(clean, tmp_path, capsys):
    out = tmp_path / "out"
    checkpoint = _fake_run(out, {"progress": PROGRESS, "config": TINY_CONFIG.to_dict(), "model": {}})
    (out / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_auc_mean": 0.5}) + '\n{"epoch": 2, "val_l')
    before = (out / "metrics.jsonl").read_text()
    assert run_trial(clean, out, "--resume", str(checkpoint)) == 2
    assert re.search(rf"--resume: {re.escape(str(out / 'metrics.jsonl'))} line 2 is not an epoch's JSON object "
                     r"\('\{\"epoch\": 2, \"val_l', cut short\?\)", error_line(capsys.readouterr().err))
    assert (out / "metrics.jsonl").read_text() == before


def test_resume_from_a_folder_without_a_checkpoint_is_refused(clean, tmp_path, capsys):
    checkpoint = _fake_run(tmp_path / "out", None)
    assert run_trial(clean, tmp_path / "out", "--resume", str(checkpoint)) == 2
    assert f"--resume {checkpoint}: no state.pt there" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("state, expected", [
    ({"progress": PROGRESS, "config": TINY_CONFIG.to_dict(), "payload": _Pickled()}, r"state\.pt.*weights_only"),
    ({"progress": PROGRESS, "config": TINY_CONFIG.replace(lr=0.5).to_dict(), "model": {}},
     r"epoch_001.*different config.*\blr\b"),
], ids=["pickled-object", "other-config"])
def test_resume_from_an_unusable_checkpoint_is_refused_with_a_clear_error(clean, tmp_path, capsys, state, expected):
    out = tmp_path / "out"
    checkpoint = _fake_run(out, state)
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert run_trial(clean, out, "--resume", str(checkpoint)) == 2
    assert re.search(expected, error_line(capsys.readouterr().err))
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


# call -> whether its keywords make it safe to run on a file someone else wrote
UNPICKLING_CALLS = {
    "torch.load": lambda keywords: keywords.get("weights_only") is True,
    "np.load": lambda keywords: keywords.get("allow_pickle", False) is not True,
    "numpy.load": lambda keywords: keywords.get("allow_pickle", False) is not True,
    "pickle.load": lambda keywords: False,
    "pickle.loads": lambda keywords: False,
    "yaml.load": lambda keywords: False,
}


def test_every_file_load_in_the_project_refuses_pickled_objects():
    """Behaviour is tested above and in test_models; this keeps a future torch.load/np.load/pickle.load from
    running code hidden in a checkpoint, weights or predictions file."""
    offenders = []
    for package in ("trainable", "sweeps", "dashboards", "search_spaces", "benchmarks", "scripts"):
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call) or ast.unparse(node.func) not in UNPICKLING_CALLS:
                    continue
                keywords = {k.arg: k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)}
                if not UNPICKLING_CALLS[ast.unparse(node.func)](keywords):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert offenders == []


# --- MLflow store and secrets ---------------------------------------------------------------------------------

def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_unreachable_tracking_server_fails_fast_before_ray_and_hides_the_password(clean, tmp_path, capsys, caplog,
                                                                                 monkeypatch, no_ray, how):
    uri = f"http://user:{SECRET}@127.0.0.1:{closed_port()}"
    extra = ["--mlflow-uri", uri] if how == "flag" else []
    if how == "environment":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    caplog.set_level("DEBUG")
    started = time.monotonic()
    assert run_sweep(clean, tmp_path / "out", "unreachable", *extra) == 2
    assert time.monotonic() - started < 10
    captured = capsys.readouterr()
    message = error_line(captured.err)
    assert re.search(r"--mlflow-uri http://127\.0\.0\.1:\d+: the MLflow tracking store does not answer "
                     r"\(.*\); start the server or pass another --mlflow-uri", message)
    assert SECRET not in captured.out + captured.err + caplog.text
    assert not (tmp_path / "out" / "unreachable").exists()


def test_a_password_in_the_tracking_uri_is_never_logged_or_printed(clean, tmp_path, capsys, caplog, monkeypatch):
    """The parent run and sweep.json written for a server URI with a password (the server replaced by a local
    store, Ray and Tune by stubs: what the runner records before trials start)."""
    store = f"sqlite:///{tmp_path / 'store.db'}"
    uri = f"https://admin:{SECRET}@mlflow.example.org:5000?token={SECRET}"
    monkeypatch.setattr(runner, "connect", lambda _: MlflowClient(store))
    for name in ("start_ray", "check_shared_storage", "check_resources", "start_registry", "warm_node_caches"):
        monkeypatch.setattr(runner, name, lambda *args, **kwargs: None)
    fitted = []
    monkeypatch.setattr(runner, "_fit", lambda sweep, parent: fitted.append((sweep.uri, parent.parent_run_id)) or 0)
    caplog.set_level("DEBUG")
    assert run_sweep(clean, tmp_path / "out", "secret", "--mlflow-uri", uri) == 0
    [(used_uri, parent_id)] = fitted
    # the password goes to MLflow's own credential variable, never into the URI MLflow sees
    assert used_uri == f"https://mlflow.example.org:5000?token={SECRET}"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("admin", SECRET)
    parent = MlflowClient(store).get_run(parent_id)
    record = (tmp_path / "out" / "secret" / "sweep.json").read_text()
    recorded = json.dumps([parent.data.params, parent.data.tags]) + record
    assert "mlflow_uri" in parent.data.params and "mlflow.example.org" in parent.data.params["mlflow_uri"]
    captured = capsys.readouterr()
    assert SECRET not in recorded + captured.out + captured.err + caplog.text + ui_command(uri)


@pytest.mark.parametrize("uri", [
    "http://user:s3cret@host:5000",
    "postgresql://mlflow:s3cret@db.internal:5432/mlflow",
    "https://host/mlflow?token=s3cret",
    "https://host/?a=1&access_token=s3cret&b=2",
    "s3://AKIAEXAMPLE:s3cret@bucket/sweeps",
    "s3://bucket/sweeps?access_key=AKIAEXAMPLE&secret_key=s3cret",
    "s3://bucket/sweeps?session_token=s3cret",
])
def test_secrets_in_uris_are_masked(uri):
    masked = mask_secrets(uri)
    assert SECRET not in masked and "***" in masked


def test_ui_command_binds_localhost():
    command = ui_command("sqlite:////data/runs/mlflow.db")
    assert "--host 127.0.0.1" in command and "0.0.0.0" not in command
    readme = (REPO / "README.md").read_text()
    for line in readme.splitlines():
        if re.search(r"\bmlflow (ui|server)\b", line):
            assert "--host 127.0.0.1" in line, line
    assert "0.0.0.0" not in readme


# --- earlier outputs ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("marker", ["sweep.json", "tuner.pkl"])
def test_a_second_sweep_of_the_same_name_leaves_the_first_intact(clean, tmp_path, capsys, no_ray, marker):
    out = tmp_path / "out"
    earlier = out / "taken"
    (earlier / "baseline-s0_1" / "checkpoint_000000").mkdir(parents=True)
    (earlier / marker).write_text("{}")
    (earlier / "ablation_summary.txt").write_text("the earlier sweep's table\n")
    (earlier / "baseline-s0_1" / "checkpoint_000000" / "state.pt").write_bytes(b"weights")
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("taken"), run_name="taken")
    client.set_terminated(run.info.run_id, "FINISHED")
    files = {path: path.read_bytes() for path in earlier.rglob("*") if path.is_file()}

    assert run_sweep(clean, out, "taken") == 2
    assert "sweep 'taken' already exists in" in error_line(capsys.readouterr().err)
    assert {path: path.read_bytes() for path in earlier.rglob("*") if path.is_file()} == files
    again = client.get_run(run.info.run_id)
    assert (again.info.status, again.info.lifecycle_stage) == ("FINISHED", "active")
