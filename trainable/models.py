"""The classifier: a backbone (trainable.backbones), a head from `HEADS`, and demographic fusion before the head.

`create_model(cfg)` builds the whole network from a TrialConfig. The backbone is a timm model (a registry name,
a hub repository or a local folder) built with `in_chans=1`, so timm folds pretrained RGB stem weights into one
grayscale channel, and `num_classes=0` because the head is ours; or a torchxrayvision chest X-ray network. Heads receive the unpooled feature map (B, C, h, w), whatever
layout the backbone emits (CNN maps, ViT tokens, NHWC maps), so attention heads like CBAM work on every family.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from timm.layers.cbam import CbamModule
from torch import nn

from .backbones import create_backbone
from .data.demographics import DEMOGRAPHICS
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


def input_stats(model: nn.Module) -> tuple[float, float]:
    """Grayscale (mean, std) the backbone expects: the average of its pretrained RGB statistics."""
    pretrained_cfg = getattr(getattr(model, "backbone", model), "pretrained_cfg", None) or {}
    mean = pretrained_cfg.get("mean") or IMAGENET_MEAN
    std = pretrained_cfg.get("std") or IMAGENET_STD
    return float(sum(mean) / len(mean)), float(sum(std) / len(std))
