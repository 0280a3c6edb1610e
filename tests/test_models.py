"""Backbone factory, heads and demographic fusion: shapes, gradients, and pretrained weights from local files,
a hub cache, a hub-layout folder and torchxrayvision's networks, all built offline."""
import re
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import save_for_hf

from trainable.backbones import check_pretrained
from trainable.config import TrialConfig
from trainable.data.demographics import DEMOGRAPHICS
from trainable.errors import ConfigError
from trainable.models import HEADS, ChestXrayNet, create_model, input_stats

BACKBONES = ("test_resnet", "test_efficientnet", "test_vit")
SIZE = 64
BATCH = 4


def make_cfg(**overrides) -> TrialConfig:
    return TrialConfig(**{"backbone": "test_resnet", "pretrained": "none", "image_size": SIZE, **overrides})


def test_heads_registry_keys():
    assert set(HEADS) == {"linear", "cbam"}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("demographics", list(DEMOGRAPHICS))
@pytest.mark.parametrize("head", list(HEADS))
def test_every_head_and_fusion_gives_logits_and_gradients(backbone, demographics, head):
    torch.manual_seed(0)
    model = create_model(make_cfg(backbone=backbone, head=head, demographics=demographics))
    assert isinstance(model, ChestXrayNet)
    features = len(DEMOGRAPHICS[demographics])
    images = torch.randn(BATCH, 1, SIZE, SIZE)
    demo = torch.rand(BATCH, features, requires_grad=True)

    logits = model(images, demo)
    assert logits.shape == (BATCH, 14)
    assert torch.isfinite(logits).all()

    logits.square().sum().backward()
    first_head_layer = next(m for m in model.head.modules() if isinstance(m, torch.nn.Linear))
    assert first_head_layer.in_features == model.backbone.num_features + features
    assert first_head_layer.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    if features:
        # the demographic inputs reach the logits through the head
        assert demo.grad.abs().sum() > 0
        assert first_head_layer.weight.grad[:, -features:].abs().sum() > 0


def test_vit_tokens_follow_image_size():
    model = create_model(make_cfg(backbone="test_vit", head="cbam", image_size=32))
    assert model(torch.randn(2, 1, 32, 32), torch.zeros(2, 0)).shape == (2, 14)


def test_input_stats_average_the_rgb_statistics():
    resnet = create_model(make_cfg(backbone="test_resnet"))
    effnet = create_model(make_cfg(backbone="test_efficientnet"))
    assert input_stats(resnet) == pytest.approx((0.5, 0.5))
    assert input_stats(effnet) == pytest.approx(((0.485 + 0.456 + 0.406) / 3, (0.229 + 0.224 + 0.225) / 3))


def _stem_name(backbone: str) -> str:
    first_conv = timm.create_model(backbone).pretrained_cfg["first_conv"]
    return first_conv if isinstance(first_conv, str) else first_conv[0]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_file_loads_with_grayscale_stem(tmp_path, backbone, suffix):
    torch.manual_seed(1)
    source = timm.create_model(backbone)  # an RGB ImageNet-style checkpoint, classifier included
    state = source.state_dict()
    path = tmp_path / f"{backbone}{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)

    model = create_model(make_cfg(backbone=backbone, pretrained=str(path)))
    loaded = model.backbone.state_dict()
    stem = _stem_name(backbone) + ".weight"
    # timm folds the RGB stem into one channel by summing over the input channels
    assert loaded[stem].shape[1] == 1
    torch.testing.assert_close(loaded[stem], state[stem].sum(dim=1, keepdim=True))
    same_shape = [k for k in loaded if k != stem and k in state and state[k].shape == loaded[k].shape]
    assert len(same_shape) > len(loaded) // 2
    for key in same_shape:
        torch.testing.assert_close(loaded[key], state[key])
    assert "state_dict" not in model.backbone.pretrained_cfg


def test_weights_of_another_backbone_are_a_config_error(tmp_path):
    path = tmp_path / "resnet_weights.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    for backbone in ("test_efficientnet", "test_vit"):
        with pytest.raises(ConfigError, match=rf"resnet_weights\.pth.*{backbone}"):
            create_model(make_cfg(backbone=backbone, pretrained=str(path)))


class _NotAWeight:
    pass


def test_unreadable_or_unsafe_weights_file_is_a_config_error(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"garbage\.pth': not a weights file \(neither safetensors nor a PyTorch"):
        create_model(make_cfg(pretrained=str(garbage)))
    # arbitrary pickled objects are refused: files are read with weights_only=True
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": _NotAWeight()}, pickled)
    with pytest.raises(ConfigError, match=r"pickled\.pth.*cannot read"):
        create_model(make_cfg(pretrained=str(pickled)))


# --- empty and foreign weights files: errors, never a fallback to the hub ------------------------------------------

@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 for this process (huggingface_hub reads the switch at call time: every HTTP request
    raises) and an empty hub cache of the test's own: nothing can download, a fallback would fail loudly."""
    import huggingface_hub.constants as hub_constants
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.mark.parametrize("content, expected", [
    (lambda path: torch.save({}, path), r"holds no weights \(an empty state dict\)"),
    (lambda path: save_file({}, str(path)), r"holds no weights \(an empty state dict\)"),
    (lambda path: path.write_bytes(b""), r"empty file, not a weights file"),
    (lambda path: path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))),
     r"not a weights file \(neither safetensors nor a PyTorch checkpoint\)"),
    (lambda path: torch.save(torch.zeros(3), path), r"not a state dict"),
], ids=["torch-empty-dict", "safetensors-empty", "zero-bytes", "random-bytes", "a-bare-tensor"])
def test_empty_or_unreadable_weights_file_is_an_error_naming_it(offline_hub, tmp_path, content, expected):
    path = tmp_path / "weights.pth"
    content(path)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=rf"pretrained='{re.escape(str(path))}': {expected}"):
        check_pretrained(make_cfg(pretrained=str(path)))
    assert time.monotonic() - started < 5


# --- hub and local-folder backbones, built offline ---------------------------------------------------------------

def _hub_layout(folder: Path, backbone: str = "test_resnet", seed: int = 3) -> dict[str, torch.Tensor]:
    """config.json + model.safetensors of an RGB timm model, as timm's push_to_hf_hub writes them."""
    torch.manual_seed(seed)
    model = timm.create_model(backbone)
    save_for_hf(model, folder, safe_serialization=True)
    return model.state_dict()


def _in_hub_cache(cache: Path, repo: str, backbone: str = "test_resnet") -> dict[str, torch.Tensor]:
    """The repository as huggingface_hub stores a download: models--ORG--NAME/{refs/main, snapshots/COMMIT/}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return _hub_layout(root / "snapshots" / commit, backbone)


def _assert_loaded(model, source_state: dict[str, torch.Tensor]) -> None:
    loaded = model.backbone.state_dict()
    stem = _stem_name("test_resnet") + ".weight"
    torch.testing.assert_close(loaded[stem], source_state[stem].sum(dim=1, keepdim=True))
    for key in (k for k in loaded if k != stem):
        torch.testing.assert_close(loaded[key], source_state[key])


def test_hf_hub_backbone_builds_offline_from_the_hub_cache(offline_hub):
    source = _in_hub_cache(offline_hub, "cxr-lab/tiny-resnet")
    cfg = make_cfg(backbone="hf-hub:cxr-lab/tiny-resnet", pretrained="imagenet")
    check_pretrained(cfg)
    model = create_model(cfg)
    _assert_loaded(model, source)
    assert model(torch.randn(2, 1, SIZE, SIZE)).shape == (2, 14)
    random_init = create_model(cfg.replace(pretrained="none"))
    assert not torch.equal(random_init.backbone.state_dict()["conv1.0.weight"],
                           model.backbone.state_dict()["conv1.0.weight"])


def test_hf_hub_backbone_not_in_the_cache_offline_is_a_fast_error_with_the_fix(offline_hub):
    cfg = make_cfg(backbone="hf-hub:cxr-lab/absent", pretrained="imagenet")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"cxr-lab/absent \(config\.json\) is not in the local Hugging Face cache and "
                                          r"HF_HUB_OFFLINE is set; offline, pass a local weights file"):
        check_pretrained(cfg)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("spelling", ["folder", "local-dir:"])
def test_local_folder_in_the_hub_layout_builds_through_timm(offline_hub, tmp_path, spelling):
    folder = tmp_path / "tiny-resnet"
    source = _hub_layout(folder)
    backbone = str(folder) if spelling == "folder" else f"local-dir:{folder}"
    model = create_model(make_cfg(backbone=backbone, pretrained="imagenet"))
    _assert_loaded(model, source)
    # a weights file of the same architecture replaces the folder's
    other = tmp_path / "other.safetensors"
    torch.manual_seed(9)
    other_state = timm.create_model("test_resnet").state_dict()
    save_file({k: v.contiguous() for k, v in other_state.items()}, str(other))
    _assert_loaded(create_model(make_cfg(backbone=backbone, pretrained=str(other))), other_state)


def test_local_folder_with_empty_or_foreign_weights_is_an_error(offline_hub, tmp_path):
    folder = tmp_path / "tiny-resnet"
    _hub_layout(folder)
    save_file({}, str(folder / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"model\.safetensors': holds no weights"):
        create_model(make_cfg(backbone=str(folder), pretrained="imagenet"))
    efficientnet = timm.create_model("test_efficientnet").state_dict()
    save_file({k: v.contiguous() for k, v in efficientnet.items()}, str(folder / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"weights do not match backbone 'test_resnet'"):
        create_model(make_cfg(backbone=str(folder), pretrained="imagenet"))
    with pytest.raises(ConfigError, match=r"no config\.json in"):
        make_cfg(backbone=str(tmp_path / "nowhere"), pretrained="none")
    with pytest.raises(ConfigError, match=r"expected hf-hub:ORG/NAME"):
        make_cfg(backbone="hf-hub:no-slash")


# --- torchxrayvision backbones ---------------------------------------------------------------------------------------

XRV_DENSENET = "xrv:densenet121-res224-chex"


@pytest.fixture(scope="module")
def xrv():
    return pytest.importorskip("torchxrayvision")


@pytest.fixture(scope="module")
def xrv_densenet_file(xrv, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A locally saved torchxrayvision DenseNet-121 (its whole state dict: features, classifier, thresholds)."""
    torch.manual_seed(4)
    network = xrv.models.DenseNet(weights=None, op_threshs=torch.rand(18))
    path = tmp_path_factory.mktemp("xrv") / "densenet121-res224-chex.pt"
    torch.save(network.state_dict(), path)
    return path, network.state_dict()


def test_xrv_backbones_build_without_downloading(xrv, offline_hub, monkeypatch):
    monkeypatch.setattr(xrv.utils, "download", lambda *args: pytest.fail("tried to download"))
    densenet = create_model(make_cfg(backbone=XRV_DENSENET, pretrained="none", image_size=32))
    assert densenet.backbone.num_features == 1024
    assert densenet(torch.randn(2, 1, 32, 32)).shape == (2, 14)
    resnet = create_model(make_cfg(backbone="xrv:resnet50-res512-all", pretrained="none", image_size=32))
    assert resnet.backbone.num_features == 2048 and resnet.backbone.model.conv1.in_channels == 1
    assert resnet(torch.randn(2, 1, 32, 32)).shape == (2, 14)


def test_xrv_weights_table_is_torchxrayvisions(xrv):
    from trainable.backbones import XRV_WEIGHTS
    assert XRV_WEIGHTS == {name: entry.get("input_resolution", 224) for name, entry in xrv.models.model_urls.items()
                           if name.startswith(("densenet121-", "resnet50-"))}


def test_xrv_config_checks_weights_names_and_their_resolution(xrv):
    with pytest.raises(ConfigError, match=r"not torchxrayvision weights; expected xrv: and one of: densenet121-res224"):
        make_cfg(backbone="xrv:densenet121-res999-nope")
    with pytest.raises(ConfigError, match=r"trained at 224 px: set image_size=224 \(image_size=64\)"):
        make_cfg(backbone=XRV_DENSENET, pretrained="imagenet", image_size=64)
    with pytest.raises(ConfigError, match=r"trained at 512 px: set image_size=512"):
        make_cfg(backbone="xrv:resnet50-res512-all", pretrained="imagenet", image_size=224)


def test_xrv_input_is_exactly_torchxrayvisions_scale(xrv):
    """The project feeds uint8 images through BatchAugment with the backbone's input stats: for an xrv backbone
    that must be xrv.utils.normalize(image, 255), i.e. [0, 255] -> [-1024, 1024], at the weights' 224 px."""
    from trainable.data.augment import BatchAugment
    cfg = make_cfg(backbone=XRV_DENSENET, pretrained="none", image_size=224, aug_hflip=False)
    mean, std = input_stats(create_model(cfg))
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 1, 224, 224), dtype=np.uint8))
    fed = BatchAugment(cfg, mean=mean, std=std).eval()(images)
    expected = torch.from_numpy(xrv.utils.normalize(images.numpy(), 255)).float()
    torch.testing.assert_close(fed, expected, rtol=0, atol=1e-3)
    assert float(fed.min()) == -1024.0 and float(fed.max()) == 1024.0


def test_xrv_backbone_trains_two_steps_from_a_locally_saved_weights_file(xrv, xrv_densenet_file, offline_hub):
    from trainable.data.augment import BatchAugment
    from trainable.losses import LabelStats, create_loss
    from trainable.optim import create_optimizer
    path, saved = xrv_densenet_file
    cfg = make_cfg(backbone=XRV_DENSENET, pretrained=str(path), image_size=224, batch_size=2, lr=1e-3)
    check_pretrained(cfg)
    model = create_model(cfg)
    loaded = model.backbone.state_dict()
    assert set(loaded) == {k for k in saved if k.startswith("features.")}
    for key, value in loaded.items():
        torch.testing.assert_close(value, saved[key])
    labels = torch.tensor([[1.0] + [0.0] * 13, [0.0] * 13 + [1.0]])
    criterion = create_loss(cfg, LabelStats.from_labels(labels.numpy()))
    optimizer = create_optimizer(cfg, model, criterion)
    augment = BatchAugment(cfg, mean=input_stats(model)[0], std=input_stats(model)[1])
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 1, 224, 224), dtype=np.uint8))
    before = model.backbone.features.conv0.weight.detach().clone()
    for step in range(2):
        loss = criterion(model(augment(images, torch.Generator().manual_seed(step))), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert not torch.equal(before, model.backbone.features.conv0.weight)


def test_xrv_resnet_loads_the_released_state_file_layout(xrv, tmp_path):
    """torchxrayvision's resnet50-res512-all file is a torchvision ResNet-50 state dict (1-channel conv1, 18-way fc)."""
    import torchvision
    torch.manual_seed(5)
    resnet = torchvision.models.resnet50(num_classes=18)
    resnet.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    path = tmp_path / "pc-nih-rsna-siim-vin-resnet50-test512-e400-state.pt"
    torch.save(resnet.state_dict(), path)
    backbone = create_model(make_cfg(backbone="xrv:resnet50-res512-all", pretrained=str(path),
                                     image_size=512)).backbone
    torch.testing.assert_close(backbone.model.layer4[2].conv3.weight, resnet.layer4[2].conv3.weight)
    with pytest.raises(ConfigError, match=r"resnet50-test512-e400-state\.pt': weights do not match torchxrayvision's "
                                          r"densenet \(.*Missing key"):
        create_model(make_cfg(backbone=XRV_DENSENET, pretrained=str(path), image_size=224))


def test_xrv_released_weights_offline_and_uncached_stop_fast_with_the_fix(xrv, monkeypatch, tmp_path):
    monkeypatch.setattr(xrv.utils, "get_cache_dir", lambda: str(tmp_path / "xrv-cache"))
    monkeypatch.setattr("trainable.backbones.PROBE_TIMEOUT_S", 2)
    monkeypatch.setattr(xrv.models, "model_urls", {**xrv.models.model_urls, "densenet121-res224-chex": {
        **xrv.models.model_urls["densenet121-res224-chex"], "weights_url": "http://127.0.0.1:9/chex.pt"}})
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"cannot download http://127\.0\.0\.1:9/chex\.pt .* and .*chex\.pt is not "
                                          r"there; offline, pass a local weights file as pretrained=.*pretrained=none"):
        check_pretrained(make_cfg(backbone=XRV_DENSENET, pretrained="imagenet", image_size=224))
    assert time.monotonic() - started < 5
