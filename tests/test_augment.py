"""BatchAugment: exact normalisation in eval, per-sample reproducible parameters in train."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from trainable.config import TrialConfig
from trainable.data.augment import BatchAugment

MEAN, STD = 0.5, 0.25
B, S = 32, 32
ALL_OFF = {"aug_hflip": False, "aug_resized_crop": False, "aug_color_jitter": False, "aug_rotation": False}
ALL_ON = {"aug_hflip": True, "aug_resized_crop": True, "aug_color_jitter": True, "aug_rotation": True}


def config(**overrides) -> SimpleNamespace:
    # TrialConfig's defaults without building one (its validation imports every registry of the project).
    defaults = {field.name: field.default for field in dataclasses.fields(TrialConfig)}
    return SimpleNamespace(**{**defaults, "image_size": S, **overrides})


def augment(train: bool, **overrides) -> BatchAugment:
    module = BatchAugment(config(**overrides), mean=MEAN, std=STD)
    return module.train(train)


def images(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, 1, S, S), dtype=torch.uint8, generator=generator)


def normalised(batch: torch.Tensor) -> torch.Tensor:
    return (batch.float() / 255 - MEAN) / STD


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_eval_is_exact_normalisation_even_with_everything_on():
    batch = images()
    out = augment(False, **ALL_ON)(batch, seeded())
    assert out.dtype == torch.float32 and out.shape == batch.shape
    torch.testing.assert_close(out, normalised(batch), rtol=0, atol=1e-6)


def test_train_with_everything_off_equals_eval():
    batch = images()
    with mock.patch.object(F, "grid_sample", side_effect=AssertionError("resampled")):
        out = augment(True, **ALL_OFF)(batch, seeded())
    torch.testing.assert_close(out, normalised(batch), rtol=0, atol=1e-6)


def test_flip_alone_flips_about_half_exactly():
    batch = images()
    with mock.patch.object(F, "grid_sample", side_effect=AssertionError("resampled")):
        out = augment(True, **{**ALL_OFF, "aug_hflip": True})(batch, seeded())
    expected_plain, expected_flipped = normalised(batch), normalised(batch.flip(-1))
    flipped = [torch.equal(out[i], expected_flipped[i]) for i in range(B)]
    plain = [torch.equal(out[i], expected_plain[i]) for i in range(B)]
    assert all(f or p for f, p in zip(flipped, plain))
    assert 0.2 * B < sum(flipped) < 0.8 * B


def test_same_seed_same_output_and_params_differ_across_the_batch():
    module = augment(True, **ALL_ON)
    batch = images()
    first, again = module(batch, seeded(7)), module(batch, seeded(7))
    assert torch.equal(first, again)
    assert not torch.equal(first, module(batch, seeded(8)))
    params = module.sample_params(B, S, S, seeded(7))
    for values in (params.theta.reshape(B, -1), params.brightness, params.contrast):
        assert len(torch.unique(values, dim=0)) == B


@pytest.mark.parametrize("option", ["aug_resized_crop", "aug_rotation"])
def test_geometric_augmentations_keep_shape_and_values_finite(option):
    batch = images()
    out = augment(True, **{**ALL_OFF, option: True})(batch, seeded())
    assert out.shape == batch.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, normalised(batch))
    low, high = normalised(torch.tensor([0, 255]))
    assert out.min() >= low - 1e-5 and out.max() <= high + 1e-5


def test_crop_boxes_follow_scale_and_ratio_bounds():
    module = augment(True, **{**ALL_OFF, "aug_resized_crop": True, "aug_crop_scale_min": 0.5})
    theta = module.sample_params(4096, S, S, seeded()).theta
    half_w, half_h = theta[:, 0, 0], theta[:, 1, 1]
    area = half_w * half_h
    assert (area >= 0.5 - 1e-5).all() and (area <= 1 + 1e-5).all()
    ratio = half_w / half_h
    assert (ratio >= 3 / 4 - 1e-5).all() and (ratio <= 4 / 3 + 1e-5).all()
    inside = (theta[:, :, 2].abs() + torch.stack([half_w, half_h], dim=1)) <= 1 + 1e-5
    assert inside.all()


def test_rotation_angles_within_degrees():
    module = augment(True, **{**ALL_OFF, "aug_rotation": True, "aug_rotation_degrees": 10.0})
    theta = module.sample_params(4096, S, S, seeded()).theta
    angles = torch.rad2deg(torch.atan2(theta[:, 1, 0], theta[:, 0, 0]))
    assert angles.abs().max() <= 10.0 + 1e-4 and angles.abs().max() > 9.0


def test_colour_jitter_factors_within_bounds_and_applied_like_torchvision():
    module = augment(True, **{**ALL_OFF, "aug_color_jitter": True, "aug_brightness": 0.3, "aug_contrast": 0.1})
    params = module.sample_params(4096, S, S, seeded())
    assert params.brightness.min() >= 0.7 and params.brightness.max() <= 1.3
    assert params.contrast.min() >= 0.9 and params.contrast.max() <= 1.1
    from torchvision.transforms.v2 import functional as TF
    batch = images().float() / 255
    small = module.sample_params(B, S, S, seeded(1))
    expected = torch.stack([
        TF.adjust_contrast(TF.adjust_brightness(image, float(b)), float(c))
        for image, b, c in zip(batch, small.brightness, small.contrast)])
    torch.testing.assert_close(module.apply(batch, small), expected, rtol=0, atol=1e-5)


def test_bf16_autocast_still_returns_float32():
    module = augment(True, **ALL_ON)
    batch = images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(batch, seeded(3))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, module(batch, seeded(3)))


def test_other_input_size_is_resampled_to_image_size():
    batch = torch.randint(0, 256, (4, 1, 2 * S, 2 * S), dtype=torch.uint8)
    assert augment(False)(batch).shape == (4, 1, S, S)
    assert augment(True, **ALL_ON)(batch, seeded()).shape == (4, 1, S, S)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    module = augment(True, **ALL_ON)
    batch = images()
    cpu = module(batch, seeded(5))
    cuda = module(batch.cuda(), seeded(5))
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=1e-3)
