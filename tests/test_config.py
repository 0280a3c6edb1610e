"""TrialConfig: the flat contract validates keys, types, registries and ranges before any trial starts."""
import math

import pytest

from search_spaces import load_presets
from trainable.config import FIELD_TYPES, RANGES, TrialConfig, parse_overrides
from trainable.errors import ConfigError


def test_defaults_are_the_chexnet_replica():
    cfg = TrialConfig()
    assert (cfg.backbone, cfg.loss, cfg.optimizer, cfg.lr, cfg.image_size, cfg.aug_hflip) == \
        ("densenet121", "bce", "adam", 1e-3, 224, True)
    assert load_presets()["chexnet_replica"] == cfg


def test_presets_match_their_papers():
    presets = load_presets()
    danny, fisher = presets["dannynet"], presets["fisher"]
    assert (danny.loss, danny.focal_gamma, danny.optimizer, danny.lr, danny.scheduler) == \
        ("focal", 2.0, "adamw", 5e-5, "plateau")
    assert danny.aug_resized_crop and danny.aug_color_jitter and danny.aug_hflip
    assert (fisher.loss, fisher.dwbce_smoothing, fisher.head, fisher.optimizer, fisher.lr, fisher.image_size) == \
        ("dynamic_weighted_bce", 0.1, "cbam", "adamw", 5e-5, 320)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key.*'lerning_rate'.*valid keys: backbone"):
        TrialConfig.from_dict({"lerning_rate": 0.1})


@pytest.mark.parametrize("key, value, expected", [
    ("loss", "hinge", r"loss='hinge' is not one of: .*focal.*dynamic_weighted_bce"),
    ("optimizer", "adamx", r"optimizer='adamx' is not one of: .*adamw"),
    ("scheduler", "step", r"scheduler='step' is not one of: plateau"),
    ("head", "mlp", r"head='mlp' is not one of: linear, cbam"),
    ("oversample", "smote", r"oversample='smote' is not one of: none, rare"),
    ("demographics", "age", r"demographics='age' is not one of: none, age_sex, age_sex_view"),
    ("precision", "fp16", r"precision='fp16' is not one of: fp32, bf16"),
    ("backbone", "densenet122", r"backbone='densenet122' is not a timm model name"),
    ("pretrained", "weights/missing.pth", r"pretrained=.*existing weights file"),
])
def test_value_outside_registry_lists_choices(key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        TrialConfig.from_dict({key: value})


@pytest.mark.parametrize("key, value", [("lr", 0), ("lr", -1e-3), ("epochs", 0), ("batch_size", -4),
                                        ("image_size", 8), ("plateau_factor", 1.5), ("head_dropout", 1.2)])
def test_out_of_range_numbers_are_rejected(key, value):
    with pytest.raises(ConfigError, match=key):
        TrialConfig.from_dict({key: value})


@pytest.mark.parametrize("pair, expected", [
    ("lr=nan", r"lr=nan must be > 0 and <= 1e\+06"), ("lr=inf", r"lr=inf must be > 0"),
    ("weight_decay=-inf", r"weight_decay=-inf must be >= 0"), ("focal_gamma=nan", r"focal_gamma=nan must be"),
    ("seed=1e23", r"seed=99999999999999991611392 must be >= 0 and <= 4294967295"),
    ("seed=inf", r"seed='inf' is not a valid int"), ("image_size=100000", r"image_size=100000 must be >= 16 and <= 2048"),
    ("batch_size=1e9", r"batch_size=1000000000 must be > 0 and <= 65536"),
])
def test_nan_inf_and_absurd_numbers_are_rejected(pair, expected):
    with pytest.raises(ConfigError, match=expected):
        TrialConfig().replace(**parse_overrides([pair]))


def test_every_numeric_key_has_a_finite_range_and_the_defaults_lie_in_it():
    numeric = {key for key, kind in FIELD_TYPES.items() if kind in (int, float)}
    assert set(RANGES) == numeric
    for key, allowed in RANGES.items():
        assert math.isfinite(allowed.low) and math.isfinite(allowed.high), key
        assert allowed.holds(getattr(TrialConfig(), key)), key


def test_string_values_are_coerced_like_cli_overrides():
    overrides = parse_overrides(["lr=3e-4", "epochs=2", "aug_color_jitter=true", "backbone=test_resnet",
                                 "focal_gamma=1"])
    cfg = TrialConfig().replace(**overrides)
    assert (cfg.lr, cfg.epochs, cfg.aug_color_jitter, cfg.backbone, cfg.focal_gamma) == \
        (3e-4, 2, True, "test_resnet", 1.0)
    assert isinstance(cfg.focal_gamma, float)


@pytest.mark.parametrize("pair, expected", [("lr", "expected key=value"), ("epochs=two", "not a valid int"),
                                            ("aug_hflip=maybe", "not a valid bool"), ("epochs=2.5", "not a valid int")])
def test_bad_overrides_name_the_pair(pair, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_overrides([pair])


def test_round_trip_through_dict_and_json():
    cfg = TrialConfig(backbone="test_resnet", loss="focal", seed=3)
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg
    assert set(cfg.to_dict()) == set(FIELD_TYPES)
