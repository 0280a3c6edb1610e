"""Search spaces as data: the arms and the Optuna space are validated against TrialConfig's registries on load."""
import optuna
import pytest

from search_spaces import BASELINE_ARM, load_arms, load_optuna_space, load_presets
from sweeps.search import DefineByRun
from trainable.config import TrialConfig
from trainable.errors import ConfigError

ISSUE_ARMS = {  # the arms the ablation must offer, with the one setting each changes
    "focal": {"loss": "focal"}, "weighted_bce": {"loss": "weighted_bce"},
    "dynamic_weighted_bce": {"loss": "dynamic_weighted_bce"}, "asymmetric": {"loss": "asl"},
    "adamw": {"optimizer": "adamw"}, "sgd": {"optimizer": "sgd"}, "cosine": {"scheduler": "cosine"},
    "color_jitter": {"aug_color_jitter": True}, "resized_crop": {"aug_resized_crop": True},
    "rotation": {"aug_rotation": True}, "resnet50": {"backbone": "resnet50"},
    "efficientnet_b3": {"backbone": "efficientnet_b3"}, "cbam": {"head": "cbam"},
    "oversample_rare": {"oversample": "rare"}, "age_sex": {"demographics": "age_sex"},
    "age_sex_view": {"demographics": "age_sex_view"},
    "pretrain_cxr": {"backbone": "xrv:densenet121-res224-chex"},
    "pretrain_cxr_mimic": {"backbone": "xrv:densenet121-res224-mimic_ch"},
    "pretrain_cxr_mae": {"backbone": "hf-hub:1aurent/densenet121.medmae_CXR_mae"},
    "aucm": {"loss": "aucm", "optimizer": "pesg"},
}


@pytest.fixture(scope="module")
def arms():
    return load_arms()


def changes(arm, arms):
    baseline = arms[BASELINE_ARM].config({}).to_dict()
    return {k: v for k, v in arm.config(baseline).to_dict().items() if v != baseline[k]}


def test_baseline_is_the_chexnet_replica(arms):
    assert arms[BASELINE_ARM].config({}) == load_presets()["chexnet_replica"] == TrialConfig()


def test_every_modification_arm_changes_one_factor_of_the_baseline(arms):
    for name, expected in ISSUE_ARMS.items():
        changed = changes(arms[name], arms)
        assert expected.items() <= changed.items(), name
        # partner values move with optimizers only (SGD's lr, AdamW's decay), never a second factor
        assert set(changed) - set(expected) <= {"lr", "weight_decay", "momentum"}, (name, changed)
    assert changes(arms["vit"], arms)["backbone"].startswith("vit_")
    factors = {arms[name].factor for name in ISSUE_ARMS}
    assert factors == {"loss", "optimizer", "scheduler", "augmentation", "backbone", "head", "sampling",
                       "demographics", "pretraining"}


def test_preset_arms_are_the_full_presets(arms):
    presets = load_presets()
    baseline = arms[BASELINE_ARM].config({}).to_dict()
    for name in ("dannynet", "fisher"):
        assert arms[name].config(baseline) == presets[name]
        assert arms[name].factor == "preset"


def test_arms_file_adds_arms_with_a_derived_factor(tmp_path, arms):
    extra = tmp_path / "arms.yaml"
    extra.write_text("warm_cosine: {scheduler: cosine, warmup_epochs: 2}\nfisher_at_224: {preset: fisher, "
                     "image_size: 224}\n")
    loaded = load_arms(extra=extra)
    assert set(loaded) == set(arms) | {"warm_cosine", "fisher_at_224"}
    assert loaded["warm_cosine"].factor == "scheduler+warmup_epochs"
    assert loaded["fisher_at_224"].factor == "preset:fisher"
    assert loaded["fisher_at_224"].config({}).image_size == 224
    assert loaded["fisher_at_224"].config({}).head == "cbam"


@pytest.mark.parametrize("text, expected", [
    ("focal_too: {loss: focal\n", r"arms\.yaml: line \d+ is not valid YAML"),
    ("x: {los: focal}\n", r"arm 'x': unknown key\(s\) 'los'; valid keys: preset, factor, backbone"),
    ("x: {loss: hinge}\n", r"arm 'x'.*loss='hinge' is not one of: bce, "),
    ("x: {lr: fast}\n", r"arm 'x': lr='fast' is not a valid float"),
    ("x: {preset: chexnet2}\n", r"arm 'x': preset='chexnet2' is not one of: chexnet_replica"),
    ("focal: {loss: focal}\n", r"arm 'focal' is already defined in .*arms\.yaml; give it another name"),
    ("- focal\n", r"expected a mapping of arm name"),
    ("x: [loss, focal]\n", r"arm 'x': expected a mapping of config key -> value"),
    # an ablation's seeds are --seeds for every arm: an arm's own seed would be silently replaced
    ("x: {loss: focal, seed: 7}\n", r"arm 'x': seed is set by the sweep \(--seeds runs seeds 0\.\.N-1 for every "
                                    r"arm\); remove seed from the arm"),
    # plain YAML keeps the last of two same-named entries without a word
    ("x: {loss: focal}\ny: {lr: 0.01}\nx: {loss: asl}\n", r"arms\.yaml: line 3: 'x' is defined twice in one mapping "
                                                        r"\(first at line 1\)"),
    ("x: {loss: focal, loss: asl}\n", r"arms\.yaml: line 1: 'loss' is defined twice in one mapping"),
    ("x: {lr: .nan}\n", r"arm 'x'.*lr=nan must be > 0"),
])
def test_bad_arms_file_names_the_file_arm_and_key(tmp_path, text, expected):
    path = tmp_path / "arms.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as caught:
        load_arms(extra=path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_optuna_space_reads_its_choices_from_the_registries():
    space = load_optuna_space()
    params = {p.name: p for p in space.params}
    assert params["oversample"].choices == ("none", "rare")
    assert params["demographics"].choices == ("none", "age_sex", "age_sex_view")
    assert params["aug_color_jitter"].choices == (False, True)
    assert params["lr"].log and params["lr"].low < params["lr"].high
    assert params["focal_gamma"].when == {"loss": ("focal",)}
    assert {"loss", "optimizer", "scheduler", "backbone", "head", "weight_decay"} <= set(params)


def test_define_by_run_suggests_conditional_params_only_when_their_condition_holds():
    space = load_optuna_space()
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    suggest = DefineByRun(space)
    for _ in range(40):
        trial = study.ask()
        suggest(trial)
        params = trial.params
        assert ("focal_gamma" in params) == (params["loss"] == "focal")
        assert ("momentum" in params) == (params["optimizer"] == "sgd")
        TrialConfig.from_dict({**space.base_config().to_dict(), **params})
        study.tell(trial, 0.5)


def test_keys_fixed_by_set_leave_the_space_with_their_conditional_params():
    space = load_optuna_space().without({"loss": "bce", "backbone": "test_resnet"})
    names = {p.name for p in space.params}
    assert not names & {"loss", "focal_gamma", "dwbce_smoothing", "asl_gamma_neg", "backbone"}
    assert "lr" in names


@pytest.mark.parametrize("params, expected", [
    ("lr: {low: 0.1, high: 0.01}", r"param 'lr': low=0.1 must be below high=0.01"),
    ("lr: {low: 0, high: 0.01, log: true}", r"param 'lr': log: true needs low > 0"),
    ("lr: {low: -1, high: 0.01}", r"param 'lr'.*lr=-1.0 must be > 0"),
    ("loss: {choices: [bce, hinge]}", r"param 'loss'.*loss='hinge' is not one of"),
    ("focal_gamma: {low: 1, high: 3, when: {loss: focal}}", r"when names 'loss', which is not a categorical "
                                                            r"param defined above it"),
    ("lerning_rate: {low: 0.1, high: 1}", r"param 'lerning_rate': not a config key"),
    ("backbone: {choices: registry}", r"choices: registry needs a key with a registry"),
    ("lr: {low: 1.0e-5, high: .inf, log: true}", r"param 'lr'.*lr=inf must be > 0 and <= 1e\+06"),
    ("lr: {low: 0.1, high: 1}\n  lr: {low: 0.01, high: 0.1}", r"line 4: 'lr' is defined twice in one mapping"),
])
def test_bad_optuna_space_names_the_param(tmp_path, params, expected):
    path = tmp_path / "space.yaml"
    path.write_text(f"base_preset: chexnet_replica\nparams:\n  {params}\n")
    with pytest.raises(ConfigError, match=expected):
        load_optuna_space(path)
