"""What keeps a GPU busy between epochs and makes runs repeatable, checked on the CPU in real trials: background
checkpoints (exact resume, complete before the report, errors raised in the loop), deterministic mode's
flags, torch.compile without recompiles, the gpu preset."""
import math
import os
import shutil

import numpy as np
import pytest
import torch

from search_spaces import load_presets
from trainable import backends
from trainable.checkpointing import HostCopy
from trainable.config import TrialConfig
from trainable.data.loader import BatchLoader
from trainable.models import create_model
from trainable.train import (PREDICTIONS_FILE, STATE_FILE, THRESHOLDS_FILE, TIMING_METRICS, load_checkpoint,
                             predict_probs, train)

TINY = dict(backbone="test_resnet", pretrained="none", image_size=32, epochs=2, batch_size=16)
# Exact resume is a CPU guarantee; on a GPU it needs deterministic mode (trainable/backends.py).
EXACT = dict(deterministic=torch.cuda.is_available())


@pytest.fixture
def torch_flags():
    """Put torch's global backend flags back as they were (train() sets them for its trial)."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1:]


def model_state(checkpoint):
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)["model"]


def same_metrics(a: dict, b: dict) -> bool:
    """Equal, timings aside; NaN (a finding without positives in the small validation split) equals NaN."""
    def kept(metrics):
        return {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()
                if k not in TIMING_METRICS}
    return kept(a) == kept(b)


# --- background checkpoints -----------------------------------------------------------------------------------

def test_host_copy_is_not_changed_by_later_updates():
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "progress": {"best": [0.5]}}
    copied = HostCopy()(state)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()                                  # the next epoch's steps change the live tensors in place
    state["progress"]["best"].append(0.7)
    assert not torch.equal(model.weight, expected["weight"])
    for key, value in expected.items():
        assert torch.equal(copied["model"][key], value), key
    assert copied["optimizer"]["state"][0]["step"] == 1 and copied["progress"] == {"best": [0.5]}


@pytest.mark.exact_resume
def test_resume_from_a_background_checkpoint_is_exact(prepared, cache_dir, tmp_path):
    """Bit for bit on the CPU (on a GPU this holds with deterministic=true: trainable/backends.py)."""
    cfg = TrialConfig(**TINY, **EXACT)
    first, reports = tmp_path / "epoch_001", []

    def keep(metrics, checkpoint):
        if metrics["epoch"] == 1:
            shutil.copytree(checkpoint, first)
        reports.append((metrics, model_state(checkpoint)))

    train(cfg, prepared, keep, cache_dir=cache_dir)
    resumed = []
    train(cfg, prepared, lambda m, c: resumed.append((m, model_state(c))), cache_dir=cache_dir, resume_from=first)
    (metrics, state), (expected_metrics, expected_state) = resumed[-1], reports[-1]
    assert [m["epoch"] for m, _ in resumed] == [2]
    assert same_metrics(metrics, expected_metrics)
    assert state.keys() == expected_state.keys()
    assert all(torch.equal(state[key], expected_state[key]) for key in state)


def test_each_report_gets_a_complete_checkpoint_in_epoch_order(prepared, cache_dir):
    cfg = TrialConfig(**{**TINY, "epochs": 3})
    seen = []

    def report(metrics, checkpoint):
        state = load_checkpoint(checkpoint, cfg)           # loadable, and the config's own, when reported
        with np.load(checkpoint / PREDICTIONS_FILE) as saved:
            assert saved["probs"].shape == (len(prepared.subset("val")), 14)
        assert (checkpoint / THRESHOLDS_FILE).is_file()
        seen.append((metrics["epoch"], state["progress"]["next_epoch"]))

    result = train(cfg, prepared, report, cache_dir=cache_dir)
    assert seen == [(1, 2), (2, 3), (3, 4)]                     # every report made, in order, before train returned
    assert [t["checkpoint_s"] >= 0 and t["train_s"] > 0 for t in result.timings] == [True] * 3


@pytest.mark.parametrize("error", [OSError("storage is full"), SystemExit(0)])
def test_what_a_report_raises_ends_the_trial(prepared, cache_dir, error):
    """A storage error, or Tune stopping the trial (SystemExit out of tune.report), reaches the training loop."""
    reported = []

    def report(metrics, checkpoint):
        reported.append(metrics["epoch"])
        raise error

    with pytest.raises(type(error)):
        train(TrialConfig(**{**TINY, "epochs": 3}), prepared, report, cache_dir=cache_dir)
    assert reported == [1]


# --- deterministic mode and compile ---------------------------------------------------------------------------

def test_deterministic_true_sets_the_flags_and_false_autotunes(prepared, cache_dir, monkeypatch, torch_flags):
    monkeypatch.delenv(backends.CUBLAS_WORKSPACE_ENV, raising=False)
    flags = []

    def report(metrics, checkpoint):
        flags.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                      torch.backends.cudnn.benchmark, os.environ.get(backends.CUBLAS_WORKSPACE_ENV)))

    one_epoch = {**TINY, "epochs": 1}
    train(TrialConfig(**one_epoch, deterministic=True), prepared, report, cache_dir=cache_dir)
    train(TrialConfig(**one_epoch, deterministic=False), prepared, report, cache_dir=cache_dir)
    assert flags[0] == (True, True, False, ":4096:8")
    assert flags[1][:3] == (False, False, True)        # the same process: the next trial undoes them


def test_compiled_trial_compiles_one_training_and_one_evaluation_graph(prepared, cache_dir, monkeypatch, tmp_path):
    """The training split ends in a partial batch; static shapes would recompile for it. Recompiles are dynamo's
    guard decisions, the same for any backend: "eager" skips inductor's minute of C++ compiling on the CPU."""
    from torch._dynamo.utils import counters
    assert len(prepared.subset("train")) % TINY["batch_size"] != 0
    monkeypatch.setattr(backends, "COMPILE_BACKEND", "eager")
    monkeypatch.setenv(backends.INDUCTOR_CACHE_ENV, str(tmp_path / "inductor"))
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    train(TrialConfig(**{**TINY, "compile": True}), prepared,
          lambda m, c: graphs.append(counters["stats"]["unique_graphs"]), cache_dir=cache_dir)
    assert graphs == [2, 2]

    # evaluation: a last batch shorter than the others is padded to their shape
    model = backends.compile_model(create_model(TrialConfig(**TINY)), tmp_path).eval()
    torch._dynamo.reset()
    counters.clear()
    images = np.zeros((40, 32, 32), np.uint8)
    loader = BatchLoader(images, np.zeros((40, 14), np.float32), np.zeros((40, 0), np.float32), batch_size=16,
                         shuffle=False)
    from trainable.data.augment import BatchAugment
    augment = BatchAugment(TrialConfig(**TINY), mean=0.5, std=0.25)
    loss, probs = predict_probs(model, augment, loader, TrialConfig(**TINY), torch.device("cpu"), pad_to=16)
    assert probs.shape == (40, 14) and math.isnan(loss)
    assert counters["stats"]["unique_graphs"] == 1


# --- the gpu preset ---------------------------------------------------------------------------------------------

def test_gpu_preset_is_the_replica_at_batch_128_in_bf16_with_sqrt_scaled_adam_lr():
    presets = load_presets()
    replica, gpu = presets["chexnet_replica"], presets["gpu"]
    assert (gpu.batch_size, gpu.precision, gpu.channels_last) == (128, "bf16", True)
    assert gpu.lr == pytest.approx(replica.lr * math.sqrt(gpu.batch_size / replica.batch_size), rel=1e-3)
    changed = {k for k, v in gpu.to_dict().items() if replica.to_dict()[k] != v}
    assert changed == {"batch_size", "precision", "channels_last", "lr"}
