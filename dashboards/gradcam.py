"""Grad-CAM (pytorch_grad_cam) of the deployed classifier: overlays for sample test images, and a localization
score against NIH's radiologist boxes.

The target layer of each member is its backbone's last feature stage as timm names it (`feature_info[-1]`: the
last conv block of a CNN, the last block of a ViT, whose tokens are laid back onto their grid). An ensemble's map
is the mean of its members' maps (each scaled to [0, 1] by pytorch_grad_cam).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from trainable.data.nih import write_atomically
from trainable.deployed import DeployedClassifier, MemberClassifier
from trainable.findings import FINDINGS
from trainable.models import ChestXrayNet, as_feature_map

from .annotations import BBOX_IMAGE_SIZE

CAM_BATCH = 16


def target_layer(model: ChestXrayNet) -> nn.Module:
    """The backbone's last feature stage (timm's feature_info names it for every model family)."""
    return model.backbone.get_submodule(model.backbone.feature_info[-1]["module"])


class _WithDemographics(nn.Module):
    """pytorch_grad_cam calls model(images): bind the batch's demographic inputs."""

    def __init__(self, member: MemberClassifier, demographics: torch.Tensor) -> None:
        super().__init__()
        self.member = member
        self.demographics = demographics

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.member(images, self.demographics)


def _member_cams(member: MemberClassifier, images: torch.Tensor, demographics: torch.Tensor,
                 findings: Sequence[int]) -> np.ndarray:
    backbone, size = member.model.backbone, member.prepare.image_size
    with GradCAM(model=_WithDemographics(member, demographics), target_layers=[target_layer(member.model)],
                 reshape_transform=lambda t: as_feature_map(backbone, t, (size, size))) as cam:
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(int(k)) for k in findings])


def grad_cams(model: DeployedClassifier, images: np.ndarray, demographics: np.ndarray,
              findings: Sequence[int]) -> np.ndarray:
    """(N, H, W) maps in [0, 1] for uint8 images (N, H, W), image i explained for finding index findings[i]."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), CAM_BATCH):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + CAM_BATCH]))[:, None].to(device)
        demo = torch.from_numpy(np.asarray(demographics[start:start + CAM_BATCH], np.float32)).to(device)
        targets = findings[start:start + CAM_BATCH]
        out.append(np.mean([_member_cams(member, batch, demo, targets) for member in model.members], axis=0))
    return np.concatenate(out) if out else np.zeros((0, *images.shape[1:]), np.float32)


# --- localization -----------------------------------------------------------------------------------------------

def cam_peak(cam: np.ndarray) -> tuple[float, float]:
    """(row, column) of a map's maximum; NaN for a flat map (Grad-CAM found no positive evidence), which then
    hits no box. A coarse map upsampled to the image has a flat top at a border cell: its centre is taken rather
    than the first pixel reached (which would sit in the image's corner)."""
    if not cam.max() > cam.min():
        return math.nan, math.nan
    rows, columns = np.nonzero(cam >= cam.max())
    return float(rows.mean()), float(columns.mean())


def localization_scores(model: DeployedClassifier, images: np.ndarray, names: np.ndarray, demographics: np.ndarray,
                        boxes: pd.DataFrame) -> pd.DataFrame:
    """Per finding with boxes on test images: boxes, hits (boxes containing the Grad-CAM peak of their finding on
    their image), score = hits / boxes. `images` (N, S, S) uint8 with `names` and `demographics` rows alike."""
    row_of = {name: row for row, name in enumerate(names)}
    boxes = boxes[boxes["image"].isin(row_of)].reset_index(drop=True)
    rows = boxes["image"].map(row_of).to_numpy()
    findings = [FINDINGS.index(name) for name in boxes["finding"]]
    cams = grad_cams(model, images[rows], demographics[rows], findings)
    size = images.shape[-1]
    peak_y, peak_x = np.array([cam_peak(cam) for cam in cams]).reshape(-1, 2).T
    # the peak's pixel centre, in the boxes' 1024-pixel coordinates
    x = (peak_x + 0.5) * BBOX_IMAGE_SIZE / size
    y = (peak_y + 0.5) * BBOX_IMAGE_SIZE / size
    hit = (x >= boxes["x"]) & (x <= boxes["x"] + boxes["w"]) & (y >= boxes["y"]) & (y <= boxes["y"] + boxes["h"])
    scored = boxes.assign(hit=hit.to_numpy())
    table = scored.groupby("finding")["hit"].agg(boxes="size", hits="sum")
    table = table.reindex([f for f in FINDINGS if f in table.index])
    table["score"] = table["hits"] / table["boxes"]
    table.index.name = "finding"
    return table.reset_index()


# --- overlays ---------------------------------------------------------------------------------------------------

def _sample_rows(labels: np.ndarray, names: np.ndarray, finding: int, count: int,
                 boxes: pd.DataFrame | None) -> np.ndarray:
    """The first `count` positives of a finding in image order, images with a box for it first."""
    positives = np.flatnonzero(labels[:, finding] > 0.5)
    if boxes is not None and len(boxes):
        boxed = set(boxes.loc[boxes["finding"] == FINDINGS[finding], "image"])
        positives = np.array(sorted(positives, key=lambda row: names[row] not in boxed), dtype=np.int64)
    return positives[:count]


def write_overlays(model: DeployedClassifier, images: np.ndarray, names: np.ndarray, demographics: np.ndarray,
                   labels: np.ndarray, probs: np.ndarray, folder: Path, *, per_finding: int = 2,
                   boxes: pd.DataFrame | None = None, synthetic: bool = False) -> list[Path]:
    """folder/<Finding>.png per finding with positive test images: each sample as image | Grad-CAM overlay,
    with its radiologist box when there is one. Returns the files written."""
    written = []
    size = images.shape[-1]
    for k, finding in enumerate(FINDINGS):
        rows = _sample_rows(labels, names, k, per_finding, boxes)
        if not len(rows):
            continue
        cams = grad_cams(model, images[rows], demographics[rows], [k] * len(rows))
        figure = Figure(figsize=(6, 0.4 + 3 * len(rows)), layout="tight")
        figure.suptitle(f"{finding}{' (SYNTHETIC data)' if synthetic else ''}")
        axes = figure.subplots(len(rows), 2, squeeze=False)
        for (left, right), row, cam in zip(axes, rows, cams):
            gray = images[row].astype(np.float32) / 255
            left.imshow(gray, cmap="gray")
            left.set_title(f"{names[row]}", fontsize=8)
            right.imshow(show_cam_on_image(np.dstack([gray] * 3), cam, use_rgb=True))
            right.set_title(f"Grad-CAM {finding}, p={probs[row, k]:.2f}", fontsize=8)
            if boxes is not None:
                for box in boxes[(boxes["image"] == names[row]) & (boxes["finding"] == finding)].itertuples():
                    scale = size / BBOX_IMAGE_SIZE
                    right.add_patch(Rectangle((box.x * scale - 0.5, box.y * scale - 0.5), box.w * scale,
                                              box.h * scale, fill=False, edgecolor="lime", linewidth=1.5))
            for axis in (left, right):
                axis.set_axis_off()
        path = folder / f"{finding}.png"
        write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
        written.append(path)
    return written
