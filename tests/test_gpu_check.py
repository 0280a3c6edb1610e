"""benchmarks/gpu_check.py: its CPU path (what CI runs, on any machine: --device cpu) measures every step it can
or says why not, its figures agree with independent computations, a failing step costs no other step's figures,
bad flags exit 2; on a CUDA machine its GPU steps run (the only test here that needs CUDA)."""
import contextlib
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainable.models import create_model
from trainable.train import CUDA_FINITE_CHECK_EVERY, EVAL_BATCH_MIN

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
CUDA_ONLY = {"sync_debug", "replica", "sharing", "peak_memory", "compile"}


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module          # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


@pytest.fixture(scope="module")
def cpu_run(gpu_check, tmp_path_factory):
    """The whole CPU path, once: (exit code, the JSON report, what it printed)."""
    folder = tmp_path_factory.mktemp("gpu_check")
    out = folder / "gpu_check.json"
    printed = folder / "printed.txt"
    with printed.open("w") as stream, contextlib.redirect_stdout(stream):
        code = gpu_check.main(["--device", "cpu", "--json", str(out), "--work", str(folder)])
    return code, json.loads(out.read_text()), printed.read_text()


def test_cpu_path_runs_every_step_or_says_why_not(gpu_check, cpu_run):
    code, report, printed = cpu_run
    steps = report["steps"]
    assert code == 0 and report["failed"] == [] and report["device"] == "cpu"
    assert list(steps) == list(gpu_check.STEPS)
    for name, result in steps.items():
        expected = "skipped" if name in CUDA_ONLY else "ok"
        assert result["status"] == expected, (name, result)
        if expected == "skipped":                    # said where it happened, in the summary and in the JSON
            assert "CUDA" in result["reason"], (name, result["reason"])
            assert f"skipped: {name}: {result['reason']}" in printed
            assert f"{name}: {result['reason']}" in report["skipped"]
    # the parts of CPU-run steps that need a GPU are named too
    assert any(line.startswith("model_bound: cudnn.benchmark") for line in report["skipped"])
    assert any(line.startswith("determinism: deterministic=false") for line in report["skipped"])


def test_cpu_path_figures_agree_with_independent_computations(gpu_check, cpu_run):
    _, report, _ = cpu_run
    figures = {name: result.get("figures", {}) for name, result in report["steps"].items()}
    assert figures["versions"]["torch"] == torch.__version__ and figures["versions"]["device"] == "cpu"
    bound = figures["model_bound"]
    assert sorted(bound) == ["batch16_images_per_s", "batch32_images_per_s"] and min(bound.values()) > 0
    loop = figures["trial_loop"]
    assert loop["model_bound_images_per_s"] == bound["batch32_images_per_s"]
    assert loop["ratio_to_model_bound"] == pytest.approx(loop["images_per_s"] / loop["model_bound_images_per_s"],
                                                         abs=1e-3)
    assert loop["host_ms_per_step"] > 0 and loop["device_ms_per_step"] > 0 and loop["batch"] == 32
    profile = figures["profile"]
    assert 0 < profile["augment_share"] < 1 and profile["ops_per_step"] > 10
    assert profile["augment_share"] == pytest.approx(profile["augment_ms_per_step"] / profile["step_ms"], rel=0.01)
    assert figures["augment_paths"]["max_abs_difference"] < 1e-4       # the two paths sample the same points
    assert figures["determinism"] == {"deterministic_bit_identical": True, "deterministic_tensors_differing": 0,
                                      "deterministic_max_abs_difference": 0.0}
    # the checkpoint holds the gpu preset's weights and buffers plus Adam's two moments per parameter, and the
    # NIH-sized validation predictions (compressed): at least the tensors, at most those plus the raw arrays
    tail = figures["epoch_tail"]
    model = create_model(gpu_check.load_preset("gpu").replace(backbone="test_resnet", image_size=64,
                                                              pretrained="none"))
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    rows = gpu_check.NIH_VAL_IMAGES
    predictions = 2 * rows * gpu_check.FINDINGS_COUNT * 4 + rows * 4 * len(f"{rows}.png")   # float32, UCS-4 names
    assert 3 * parameters + buffers <= tail["checkpoint_mb"] * 2**20 * (1 + 1e-3)
    assert tail["checkpoint_mb"] * 2**20 <= 3 * parameters + buffers + predictions + 2**20
    assert tail["checkpoint_background_loop_wait_s"] <= tail["checkpoint_background_writer_s"]
    assert tail["val_s_per_nih_epoch"] == pytest.approx(gpu_check.NIH_VAL_IMAGES / tail["val_images_per_s"], rel=0.01)
    assert tail["eval_batch"] == max(EVAL_BATCH_MIN, 2 * loop["batch"]) and math.isfinite(tail["tail_share_background"])


def test_a_failing_step_is_recorded_and_the_next_one_still_runs(gpu_check, tmp_path, monkeypatch, capsys):
    def broken(check):
        raise RuntimeError("simulated failure")

    monkeypatch.setitem(gpu_check.STEPS, "augment_paths", broken)
    out = tmp_path / "report.json"
    code = gpu_check.main(["--device", "cpu", "--only", "augment_paths,versions", "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 1 and report["failed"] == ["augment_paths"]
    assert report["steps"]["augment_paths"]["error"] == "RuntimeError: simulated failure"
    assert "simulated failure" in report["steps"]["augment_paths"]["traceback"]
    assert report["steps"]["versions"]["status"] == "ok"
    assert "FAILED: augment_paths: RuntimeError: simulated failure" in capsys.readouterr().out


def test_steps_past_the_time_budget_are_skipped_with_the_reason(gpu_check, tmp_path):
    out = tmp_path / "report.json"
    assert gpu_check.main(["--device", "cpu", "--only", "versions,determinism", "--budget-s", "0",
                           "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {name: result["status"] for name, result in report["steps"].items()} == {"versions": "skipped",
                                                                                   "determinism": "skipped"}
    assert report["skipped"] == [f"{name}: time budget of 0 s spent" for name in ("versions", "determinism")]


def test_an_unknown_step_is_an_error_naming_it(gpu_check, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert gpu_check.main(["--only", "versions,warp_drive", "--json", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --only 'versions,warp_drive': unknown step(s) warp_drive; steps: versions,")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA on a machine without it")
def test_device_cuda_without_cuda_is_an_error(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--device", "cuda", "--json", str(tmp_path / "report.json")]) == 2
    assert capsys.readouterr().err == "error: --device cuda: no CUDA device is visible to torch\n"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU steps need CUDA")
def test_gpu_steps_on_cuda(tmp_path):
    """In a fresh process (cuBLAS's workspace is fixed at its first call): the GPU-only figures exist, the
    training loop syncs only where train.py does, and deterministic mode repeats bit for bit."""
    out = tmp_path / "report.json"
    steps = 10
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--steps", str(steps), "--json", str(out),
                           "--only", "versions,model_bound,trial_loop,sync_debug,determinism,peak_memory"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    figures = {name: result["figures"] for name, result in report["steps"].items()}
    assert figures["versions"]["device"].startswith("cuda") and figures["versions"]["gpu"]
    assert figures["model_bound"]["batch128_benchmark_on_images_per_s"] > 0
    assert figures["model_bound"]["batch128_benchmark_off_images_per_s"] > 0
    # train.py syncs at the first step's finiteness check, every CUDA_FINITE_CHECK_EVERY steps, and twice at
    # the epoch's end (its loss's finiteness and value); any other sync is a hidden one
    assert figures["sync_debug"]["syncs"] <= 2 + math.ceil(figures["sync_debug"]["steps"] / CUDA_FINITE_CHECK_EVERY)
    assert figures["determinism"]["deterministic_bit_identical"] is True
    assert 0 < figures["peak_memory"]["train_peak_gib"] <= figures["peak_memory"]["train_reserved_gib"]
    assert np.isfinite(figures["trial_loop"]["ratio_to_model_bound"])
