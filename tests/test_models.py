"""Backbone factory, heads and demographic fusion: shapes, gradients, and pretrained weights from local files."""
import pytest
import timm
import torch
from safetensors.torch import save_file

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
    with pytest.raises(ConfigError, match=r"garbage\.pth.*cannot read"):
        create_model(make_cfg(pretrained=str(garbage)))
    # arbitrary pickled objects are refused: files are read with weights_only=True
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": _NotAWeight()}, pickled)
    with pytest.raises(ConfigError, match=r"pickled\.pth.*cannot read"):
        create_model(make_cfg(pretrained=str(pickled)))
