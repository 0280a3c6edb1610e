"""Batched augmentation on the trial's device, with per-sample random parameters.

torchvision's v2 transforms on a batched tensor share one random draw across the whole batch; here every image
gets its own flip, crop, rotation and colour factors, still in a handful of batched tensor ops:
  * flip, random-resized crop and rotation compose into one (B, 2, 3) affine matrix, applied with a single
    `affine_grid` + `grid_sample` (bilinear, zero padding like torchvision's RandomRotation fill=0);
    a flip on its own is an exact `torch.flip` instead, and with no geometric augmentation nothing is resampled;
  * colour jitter = per-sample brightness then contrast factor, each uniform in [1 - x, 1 + x], with the same
    arithmetic and clamping as torchvision's adjust_brightness / adjust_contrast (fixed order, where
    torchvision's ColorJitter shuffles the order per call).
Parameters are drawn on the CPU from the trainer's generator, so a seeded run is reproducible on any device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CROP_RATIO = (3 / 4, 4 / 3)       # aspect-ratio range of RandomResizedCrop
CROP_ATTEMPTS = 10                # like RandomResizedCrop: first of 10 draws that fits, else the whole image


@dataclass
class AugmentParams:
    """Per-sample parameters of one batch (CPU tensors); None where an augmentation is disabled."""
    flip: torch.Tensor | None            # bool (B,)
    theta: torch.Tensor | None           # float32 (B, 2, 3) output -> input affine, normalized coordinates
    brightness: torch.Tensor | None      # float32 (B,)
    contrast: torch.Tensor | None        # float32 (B,)


def _uniform(count: int, low: float, high: float, generator: torch.Generator | None,
             shape: tuple[int, ...] = ()) -> torch.Tensor:
    return low + (high - low) * torch.rand((count, *shape), generator=generator)


def _crop_boxes(count: int, scale_min: float, aspect: float, generator: torch.Generator | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """RandomResizedCrop's box, as half-width/half-height fractions of the image (1 = whole image)."""
    scale = _uniform(count, scale_min, 1.0, generator, (CROP_ATTEMPTS,))
    log_ratio = _uniform(count, math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator, (CROP_ATTEMPTS,))
    ratio = log_ratio.exp()
    width = (scale * ratio * aspect).sqrt()           # aspect = H / W of the source image
    height = (scale / ratio / aspect).sqrt()
    fits = (width <= 1) & (height <= 1)
    first = fits.int().argmax(dim=1, keepdim=True)    # first attempt that fits
    found = fits.any(dim=1)
    one = torch.ones(count)
    return (torch.where(found, width.gather(1, first).squeeze(1), one),
            torch.where(found, height.gather(1, first).squeeze(1), one))


class BatchAugment(torch.nn.Module):
    def __init__(self, cfg, *, mean: float, std: float) -> None:
        super().__init__()
        self.hflip = cfg.aug_hflip
        self.resized_crop = cfg.aug_resized_crop
        self.crop_scale_min = cfg.aug_crop_scale_min
        self.color_jitter = cfg.aug_color_jitter
        self.brightness = cfg.aug_brightness
        self.contrast = cfg.aug_contrast
        self.rotation = cfg.aug_rotation
        self.rotation_degrees = cfg.aug_rotation_degrees
        self.image_size = cfg.image_size
        self.mean = mean
        self.std = std

    @property
    def geometric(self) -> bool:
        """Whether training needs a resampling (crop or rotation; a flip alone does not)."""
        return self.resized_crop or self.rotation

    # --- parameters -------------------------------------------------------------------------------------

    def sample_params(self, count: int, height: int, width: int,
                      generator: torch.Generator | None = None) -> AugmentParams:
        flip = torch.rand(count, generator=generator) < 0.5 if self.hflip else None
        theta = self._sample_theta(count, height / width, flip, generator) if self.geometric else None
        brightness = contrast = None
        if self.color_jitter:
            brightness = _uniform(count, max(0.0, 1 - self.brightness), 1 + self.brightness, generator)
            contrast = _uniform(count, max(0.0, 1 - self.contrast), 1 + self.contrast, generator)
        return AugmentParams(flip, theta, brightness, contrast)

    def _sample_theta(self, count: int, aspect: float, flip: torch.Tensor | None,
                      generator: torch.Generator | None) -> torch.Tensor:
        """One output->input affine per sample: input = centre + crop_scale @ rotation @ flip @ output."""
        half_w, half_h = torch.ones(count), torch.ones(count)
        centre_x, centre_y = torch.zeros(count), torch.zeros(count)
        if self.resized_crop:
            half_w, half_h = _crop_boxes(count, self.crop_scale_min, aspect, generator)
            centre_x = (1 - half_w) * _uniform(count, -1.0, 1.0, generator)
            centre_y = (1 - half_h) * _uniform(count, -1.0, 1.0, generator)
        angle = torch.zeros(count)
        if self.rotation:
            angle = torch.deg2rad(_uniform(count, -self.rotation_degrees, self.rotation_degrees, generator))
        sign = torch.where(flip, -1.0, 1.0) if flip is not None else torch.ones(count)
        cos, sin = angle.cos(), angle.sin()
        # Rotation in pixel space, expressed in normalized coordinates (differ when H != W).
        linear = torch.stack([torch.stack([half_w * cos * sign, -half_w * sin * aspect], dim=1),
                              torch.stack([half_h * sin / aspect * sign, half_h * cos], dim=1)], dim=1)
        return torch.cat([linear, torch.stack([centre_x, centre_y], dim=1)[:, :, None]], dim=2)

    # --- application ------------------------------------------------------------------------------------

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Augment float images in [0, 1] (B, C, H, W) with the given parameters."""
        device = images.device
        if params.theta is not None:
            size = (len(images), images.shape[1], self.image_size, self.image_size)
            grid = F.affine_grid(params.theta.to(device), size, align_corners=False)
            images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        elif params.flip is not None:
            flip = params.flip.to(device)[:, None, None, None]
            images = torch.where(flip, images.flip(-1), images)
        if params.brightness is not None:
            images = (images * params.brightness.to(device)[:, None, None, None]).clamp_(0, 1)
        if params.contrast is not None:
            factor = params.contrast.to(device)[:, None, None, None]
            mean = images.mean(dim=(1, 2, 3), keepdim=True)
            images = (factor * images + (1 - factor) * mean).clamp_(0, 1)
        return images

    def _to_image_size(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] == (self.image_size, self.image_size):
            return images
        return F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                             antialias=True, align_corners=False)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (B, 1, H, W) -> normalized float32 (B, 1, image_size, image_size) on the same device."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (B, 1, H, W), got {images.dtype} {tuple(images.shape)}")
        # Float32 throughout, even under bf16 autocast: affine_grid's matmul would otherwise round the
        # sampling grid to bf16 (about half a pixel at 224 px).
        with torch.autocast(device_type=images.device.type, enabled=False):
            floats = images.float().div_(255)
            if self.training:
                params = self.sample_params(len(images), *images.shape[-2:], generator=generator)
                floats = self.apply(floats, params)
            floats = self._to_image_size(floats)
            return floats.sub_(self.mean).div_(self.std)
