"""Optimizer factory and the per-epoch scheduler registry: classes, hyperparameters, lr trajectories, resume."""
import io
import math

import pytest
import torch

from trainable.config import TrialConfig
from trainable.errors import ConfigError
from trainable.optim import SCHEDULERS, create_optimizer, create_scheduler


def make_cfg(**overrides) -> TrialConfig:
    return TrialConfig(**{"backbone": "test_resnet", "pretrained": "none", "image_size": 32, **overrides})


def tiny_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))


def test_scheduler_registry_keys():
    assert set(SCHEDULERS) == {"plateau", "cosine", "none"}


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                       ("sgd", torch.optim.SGD)])
def test_optimizer_class_and_hyperparameters(name, cls):
    cfg = make_cfg(optimizer=name, lr=3e-4, weight_decay=1e-2, momentum=0.8)
    optimizer = create_optimizer(cfg, tiny_model())
    assert type(optimizer) is cls
    decayed = [g for g in optimizer.param_groups if g["weight_decay"] > 0]
    undecayed = [g for g in optimizer.param_groups if g["weight_decay"] == 0]
    assert all(g["lr"] == 3e-4 for g in optimizer.param_groups)
    assert [g["weight_decay"] for g in decayed] == [1e-2]
    assert all(p.ndim == 2 for p in decayed[0]["params"])  # biases and norm weights are not decayed
    assert all(p.ndim == 1 for g in undecayed for p in g["params"])
    if name == "sgd":
        assert all(g["momentum"] == 0.8 and g["nesterov"] for g in optimizer.param_groups)
    else:
        assert all("momentum" not in g for g in optimizer.param_groups)


def test_sgd_without_momentum_is_a_config_error():
    with pytest.raises(ConfigError, match="optimizer='sgd'.*momentum=0"):
        create_optimizer(make_cfg(optimizer="sgd", momentum=0.0), tiny_model())


def lr_trajectory(cfg, val_losses):
    """The lr each epoch trains with, then the lr after the last step."""
    optimizer = create_optimizer(cfg, tiny_model())
    scheduler = create_scheduler(cfg, optimizer)
    lrs = []
    for loss in val_losses:
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step(loss)
    lrs.append(scheduler.lr)
    return lrs


def test_plateau_reduces_after_patience():
    cfg = make_cfg(scheduler="plateau", lr=1.0, plateau_factor=0.1, plateau_patience=1)
    flat = lr_trajectory(cfg, [1.0] * 6)
    # epoch 1 sets the best; two epochs without improvement (> patience) cut the lr, and again after that
    assert flat == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    improving = lr_trajectory(cfg, [1.0, 0.9, 0.8, 0.7, 0.6])
    assert improving == pytest.approx([1.0] * 6)


def test_cosine_warms_up_then_decays_to_zero():
    epochs, warmup = 8, 2
    lrs = lr_trajectory(make_cfg(scheduler="cosine", lr=1.0, epochs=epochs, warmup_epochs=warmup), [1.0] * epochs)
    assert lrs[:warmup + 1] == pytest.approx([1 / 3, 2 / 3, 1.0])
    decay = [0.5 * (1 + math.cos(math.pi * t / (epochs - warmup))) for t in range(epochs - warmup + 1)]
    assert lrs[warmup:] == pytest.approx(decay, abs=1e-9)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9)
    no_warmup = lr_trajectory(make_cfg(scheduler="cosine", lr=1.0, epochs=4, warmup_epochs=0), [1.0] * 4)
    quarter = math.cos(math.pi / 4)
    assert no_warmup == pytest.approx([1.0, 0.5 * (1 + quarter), 0.5, 0.5 * (1 - quarter), 0.0], abs=1e-9)


def test_none_is_constant():
    assert lr_trajectory(make_cfg(scheduler="none", lr=0.3), [1.0, 0.5, 2.0, 2.0]) == pytest.approx([0.3] * 5)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_state_dict_round_trip_continues_identically(name):
    cfg = make_cfg(scheduler=name, lr=1.0, epochs=8, warmup_epochs=2, plateau_patience=1)
    losses = [1.0, 0.9, 0.95, 0.97, 0.99, 0.8, 0.85, 0.9]

    def run(optimizer, scheduler, epochs):
        lrs = []
        for loss in epochs:
            optimizer.step()
            scheduler.step(loss)
            lrs.append(optimizer.param_groups[0]["lr"])
        return lrs

    model = tiny_model()
    optimizer = create_optimizer(cfg, model)
    scheduler = create_scheduler(cfg, optimizer)
    run(optimizer, scheduler, losses[:3])
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    expected = run(optimizer, scheduler, losses[3:])

    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # checkpoints are read back with weights_only
    resumed_optimizer = create_optimizer(cfg, model)
    resumed = create_scheduler(cfg, resumed_optimizer)
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["scheduler"])
    assert run(resumed_optimizer, resumed, losses[3:]) == pytest.approx(expected)
