"""Loss registry: every entry is finite and differentiable, and each equals its reference definition."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from trainable.config import TrialConfig
from trainable.losses import LOSSES, MAX_POS_WEIGHT, LabelStats, create_loss

K = 14


def make_cfg(**overrides) -> TrialConfig:
    return TrialConfig(**{"backbone": "test_resnet", "pretrained": "none", "image_size": 32, **overrides})


def loss_cfg(name: str) -> TrialConfig:
    """The loss with the optimizer it needs (LibAUC's aucm is optimised by its PESG)."""
    return make_cfg(loss=name, **({"optimizer": "pesg"} if name == "aucm" else {}))


@pytest.fixture
def stats() -> LabelStats:
    rng = np.random.default_rng(0)
    labels = (rng.random((200, K)) < np.linspace(0.02, 0.4, K)).astype(np.float32)
    labels[:3, :] = 1  # every class has positives
    return LabelStats.from_labels(labels)


def random_batch(seed=0, batch=8):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, K, generator=generator) * 3
    targets = (torch.rand(batch, K, generator=generator) < 0.3).float()
    return logits, targets


def test_registry_keys():
    assert set(LOSSES) == {"bce", "weighted_bce", "focal", "dynamic_weighted_bce",
                           "asl", "poly", "twoway", "zlpr", "db", "aucm"}


def test_label_stats_from_labels():
    labels = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 0]], np.float32)
    stats = LabelStats.from_labels(labels)
    np.testing.assert_array_equal(stats.positives, [2, 0, 3])
    np.testing.assert_array_equal(stats.negatives, [2, 4, 1])
    assert stats.num_samples == 4


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_is_finite_and_differentiable(name, stats):
    criterion = create_loss(loss_cfg(name), stats)
    logits, targets = random_batch()
    logits.requires_grad_(True)
    loss = criterion(logits, targets)
    assert loss.ndim == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_runs_under_bf16_autocast(name, stats):
    criterion = create_loss(loss_cfg(name), stats)
    layer = torch.nn.Linear(16, K)
    features = torch.randn(8, 16)
    _, targets = random_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(features)
        assert logits.dtype == torch.bfloat16
        loss = criterion(logits, targets)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(layer.weight.grad).all()


def test_bce_equals_torch(stats):
    logits, targets = random_batch()
    loss = create_loss(make_cfg(loss="bce"), stats)(logits, targets)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, targets))


def test_focal_equals_torchvision(stats):
    logits, targets = random_batch()
    loss = create_loss(make_cfg(loss="focal", focal_gamma=1.5, focal_alpha=0.3), stats)(logits, targets)
    expected = sigmoid_focal_loss(logits, targets, alpha=0.3, gamma=1.5, reduction="mean")
    torch.testing.assert_close(loss, expected)


def test_weighted_bce_uses_training_prevalence(stats):
    criterion = create_loss(make_cfg(loss="weighted_bce"), stats)
    expected = (stats.num_samples - stats.positives) / stats.positives
    np.testing.assert_allclose(criterion.loss.pos_weight.numpy(), expected, rtol=1e-6)
    logits, targets = random_batch()
    torch.testing.assert_close(criterion(logits, targets), F.binary_cross_entropy_with_logits(
        logits, targets, pos_weight=torch.as_tensor(expected, dtype=torch.float32)))


def test_weighted_bce_caps_classes_without_positives():
    stats = LabelStats(positives=np.array([0.0, 1.0, 50.0] + [10.0] * (K - 3)), num_samples=10_000)
    criterion = create_loss(make_cfg(loss="weighted_bce"), stats)
    weights = criterion.loss.pos_weight.numpy()
    assert weights[0] == weights[1] == MAX_POS_WEIGHT
    assert weights[2] == pytest.approx((10_000 - 50) / 50)


def _dynamic_bce_by_hand(logits, targets, smoothing):
    """The documented formula, element by element."""
    batch, classes = len(targets), len(targets[0])
    total = 0.0
    for k in range(classes):
        ratio = sum(targets[i][k] for i in range(batch)) / batch
        ratio = (1 - smoothing) * ratio + smoothing * 0.5
        for i in range(batch):
            p = 1 / (1 + math.exp(-logits[i][k]))
            y = targets[i][k]
            weight = (1 - ratio) if y == 1 else ratio
            total += weight * -(y * math.log(p) + (1 - y) * math.log(1 - p))
    return total / (batch * classes)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
def test_dynamic_weighted_bce_matches_hand_computation(smoothing, stats):
    logits = [[0.5, -1.0, 2.0], [-0.3, 0.2, 1.5], [1.2, -2.0, -0.5], [0.0, 0.7, 0.1]]
    targets = [[1, 0, 0], [0, 0, 1], [1, 0, 0], [1, 0, 0]]  # ratios 3/4, 0 (no positives), 1/4
    criterion = create_loss(make_cfg(loss="dynamic_weighted_bce", dwbce_smoothing=smoothing), stats)
    loss = criterion(torch.tensor(logits), torch.tensor(targets, dtype=torch.float32))
    assert loss.item() == pytest.approx(_dynamic_bce_by_hand(logits, targets, smoothing), rel=1e-5)


def test_dynamic_weighted_bce_is_half_bce_for_balanced_batches(stats):
    logits = torch.randn(4, K)
    targets = torch.tensor([[1.0] * K, [0.0] * K, [1.0] * K, [0.0] * K])
    for smoothing in (0.0, 0.3):
        criterion = create_loss(make_cfg(loss="dynamic_weighted_bce", dwbce_smoothing=smoothing), stats)
        torch.testing.assert_close(criterion(logits, targets),
                                   0.5 * F.binary_cross_entropy_with_logits(logits, targets))


def test_dynamic_weighted_bce_ignores_negatives_of_absent_class_without_smoothing(stats):
    criterion = create_loss(make_cfg(loss="dynamic_weighted_bce", dwbce_smoothing=0.0), stats)
    logits = torch.randn(4, K, requires_grad=True)
    targets = torch.zeros(4, K)
    targets[:2, 1:] = 1  # class 0 has no positives in this batch
    criterion(logits, targets).backward()
    assert logits.grad[:, 0].abs().sum() == 0
    assert logits.grad[:, 1:].abs().sum() > 0


def test_aucm_is_libaucs_multi_label_auc_margin_loss_on_sigmoid_scores(stats):
    from libauc.losses import MultiLabelAUCMLoss
    logits, targets = random_batch(seed=4, batch=16)
    criterion = create_loss(make_cfg(loss="aucm", optimizer="pesg"), stats)
    aucm = criterion.loss
    with torch.no_grad():                      # a, b, alpha as PESG would have moved them
        aucm.a.copy_(torch.linspace(0.1, 0.9, K))
        aucm.b.copy_(torch.linspace(0.05, 0.3, K))
        aucm.alpha.copy_(torch.linspace(0.0, 2.0, K))
    reference = MultiLabelAUCMLoss(margin=1.0, num_labels=K, imratio=(stats.positives / stats.num_samples).tolist(),
                                   device=torch.device("cpu"))
    reference.a, reference.b, reference.alpha = (getattr(aucm, n).detach().clone() for n in ("a", "b", "alpha"))
    expected = reference(torch.sigmoid(logits), targets, auto=False)
    torch.testing.assert_close(criterion(logits, targets), expected)
    # the min-max variables are this module's parameters: checkpointed, moved with .to(), seen by PESG
    assert {"loss.a", "loss.b", "loss.alpha"} <= set(criterion.state_dict())
    criterion(logits, targets).backward()
    assert aucm.a.grad is not None and aucm.alpha.grad is not None
