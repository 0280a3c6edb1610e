"""The classifier: a timm backbone, a head from `HEADS`, and demographic fusion before the head.

`create_model(cfg)` builds the whole network from a TrialConfig. The backbone is any timm model; it is built
with `in_chans=1` so timm folds pretrained RGB stem weights into one grayscale channel, and with
`num_classes=0` because the head is ours. Heads receive the unpooled feature map (B, C, h, w), whatever
layout the backbone emits (CNN maps, ViT tokens, NHWC maps), so attention heads like CBAM work on every family.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers.cbam import CbamModule
from timm.models import load_state_dict, resolve_model_input_args
from torch import nn

from .data.demographics import DEMOGRAPHICS
from .errors import ConfigError
from .findings import NUM_FINDINGS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- heads ----------------------------------------------------------------------------------------

def fuse_demographics(pooled: torch.Tensor, demographics: torch.Tensor | None) -> torch.Tensor:
    """Concatenate the demographic vector to the pooled image features.

    The demographic features are already centred and of unit scale (trainable.data.demographics), like
    the pooled activations, so no extra normalisation layer is used; the following Linear learns their weight.
    """
    if demographics is None or demographics.shape[1] == 0:
        return pooled
    return torch.cat([pooled, demographics.to(pooled.dtype)], dim=1)


class LinearHead(nn.Module):
    """CheXNet: global average pool -> (+ demographics) -> dropout -> Linear."""

    def __init__(self, feature_channels: int, num_demographic: int, num_classes: int, cfg: Any) -> None:
        super().__init__()
        self.dropout = nn.Dropout(cfg.drop_rate)
        self.fc = nn.Linear(feature_channels + num_demographic, num_classes)

    def forward(self, feature_map: torch.Tensor, demographics: torch.Tensor | None) -> torch.Tensor:
        pooled = feature_map.mean(dim=(2, 3))
        return self.fc(self.dropout(fuse_demographics(pooled, demographics)))


class CbamHead(nn.Module):
    """Fisher 2025: CBAM on the feature map -> global average pool -> (+ demographics) -> MLP 128 -> 64 -> classes.

    timm's CbamModule is the original CBAM: channel attention from a shared MLP (reduction 16) over the
    average- and max-pooled map, then spatial attention from a 7x7 conv over the channel average and max.
    """

    def __init__(self, feature_channels: int, num_demographic: int, num_classes: int, cfg: Any) -> None:
        super().__init__()
        self.attention = CbamModule(feature_channels, rd_ratio=1 / 16, spatial_kernel_size=7)
        self.mlp = nn.Sequential(
            nn.Linear(feature_channels + num_demographic, 128), nn.ReLU(inplace=True), nn.Dropout(cfg.head_dropout),
            nn.Linear(128, 64), nn.ReLU(inplace=True), nn.Dropout(cfg.head_dropout),
            nn.Linear(64, num_classes),
        )

    def forward(self, feature_map: torch.Tensor, demographics: torch.Tensor | None) -> torch.Tensor:
        pooled = self.attention(feature_map).mean(dim=(2, 3))
        return self.mlp(fuse_demographics(pooled, demographics))


HEADS: dict[str, type[nn.Module]] = {
    "linear": LinearHead,
    "cbam": CbamHead,
}


# --- backbone feature maps ------------------------------------------------------------------------

def as_feature_map(backbone: nn.Module, features: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """Bring `forward_features` output to (B, C, h, w).

    CNNs already give that; ViT-style models give tokens (B, N, C) whose prefix (class/register) tokens are
    dropped and whose patch tokens are laid back onto their grid; some (Swin, ...) give NHWC maps.
    """
    if features.ndim == 4:
        return features.permute(0, 3, 1, 2) if getattr(backbone, "output_fmt", "NCHW") == "NHWC" else features
    if features.ndim != 3:
        raise ValueError(f"backbone features of shape {tuple(features.shape)} are neither a map nor tokens")
    patches = features[:, getattr(backbone, "num_prefix_tokens", 0):]
    batch, count, channels = patches.shape
    # The patch grid has the image's aspect ratio.
    height = max(1, round(math.sqrt(count * image_hw[0] / image_hw[1])))
    width = count // height
    if height * width != count:
        raise ValueError(f"{count} patch tokens do not form a grid for a {image_hw[0]}x{image_hw[1]} image")
    return patches.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


class ChestXrayNet(nn.Module):
    """images (B, 1, H, W) normalised, demographics (B, D) -> logits (B, num_classes)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor, demographics: torch.Tensor | None = None) -> torch.Tensor:
        features = self.backbone.forward_features(images)
        return self.head(as_feature_map(self.backbone, features, tuple(images.shape[-2:])), demographics)


# --- construction ---------------------------------------------------------------------------------

def create_model(cfg: Any, num_classes: int = NUM_FINDINGS) -> ChestXrayNet:
    backbone = create_backbone(cfg)
    head = HEADS[cfg.head](backbone.num_features, len(DEMOGRAPHICS[cfg.demographics]), num_classes, cfg)
    return ChestXrayNet(backbone, head)


def create_backbone(cfg: Any) -> nn.Module:
    """The timm backbone without classifier, grayscale stem, sized for cfg.image_size, with cfg.pretrained weights."""
    # timm decides which models take img_size (fixed-size ViTs and friends resample their position embeddings).
    # The resolved pretrained_cfg is passed back so a tagged name (resnet50.a1_in1k) keeps its weights choice.
    kwargs = resolve_model_input_args(cfg.backbone, args={"img_size": cfg.image_size, "in_chans": 1})
    kwargs.update(num_classes=0, drop_rate=cfg.drop_rate)
    if cfg.pretrained == "none":
        return timm.create_model(**kwargs, pretrained=False)
    if cfg.pretrained == "imagenet":
        try:
            return timm.create_model(**kwargs, pretrained=True)
        except (OSError, RuntimeError) as err:
            raise ConfigError(
                f"pretrained=imagenet: could not load timm's weights for backbone {cfg.backbone!r} ({_one_line(err)}); "
                "offline, pass a local weights file as pretrained") from None
    return _backbone_from_file(Path(cfg.pretrained), kwargs)


def check_pretrained(cfg: Any) -> None:
    """Fail now, naming the file, if cfg.pretrained is a weights file that does not load into cfg.backbone.

    Run before any trial starts (the CLIs, the sweep drivers), so a wrong file does not fail every trial.
    """
    if cfg.pretrained not in ("none", "imagenet"):
        create_backbone(cfg)


def _backbone_from_file(path: Path, kwargs: dict[str, Any]) -> nn.Module:
    """Load a local weights file (air-gapped clusters) strictly: a file of another backbone is an error.

    timm's own file loading drops the strict key check when the classifier is removed (num_classes=0), so
    the file is read here (timm's load_state_dict: torch.load with weights_only=True, or safetensors), its
    classifier removed, and handed to timm as a state dict with strict loading; timm still applies the
    model's checkpoint filter (e.g. position-embedding resampling) and the RGB -> grayscale stem fold.
    """
    name = kwargs["model_name"]
    try:
        state_dict = load_state_dict(str(path))
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"pretrained={str(path)!r}: cannot read weights file ({_one_line(err)})") from None
    classifiers = kwargs["pretrained_cfg"].get("classifier") or ()
    for prefix in (classifiers,) if isinstance(classifiers, str) else classifiers:
        state_dict.pop(f"{prefix}.weight", None)
        state_dict.pop(f"{prefix}.bias", None)
    try:
        backbone = timm.create_model(
            **kwargs, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state_dict, classifier=None))
    except (RuntimeError, KeyError, ValueError) as err:
        raise ConfigError(
            f"pretrained={str(path)!r}: weights do not match backbone {name!r} ({_one_line(err)})") from None
    backbone.pretrained_cfg.pop("state_dict", None)  # don't keep a second copy of the weights alive
    return backbone


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def input_stats(model: nn.Module) -> tuple[float, float]:
    """Grayscale (mean, std) the backbone expects: the average of its pretrained RGB statistics."""
    pretrained_cfg = getattr(getattr(model, "backbone", model), "pretrained_cfg", None) or {}
    mean = pretrained_cfg.get("mean") or IMAGENET_MEAN
    std = pretrained_cfg.get("std") or IMAGENET_STD
    return float(sum(mean) / len(mean)), float(sum(std) / len(std))
