"""Batched augmentation on the trial's device, with per-sample random parameters.

torchvision's v2 transforms on a batched tensor share one random draw across the whole batch; here every image
gets its own flip, crop, rotation and colour factors, still in a handful of batched tensor ops:
  * flip, random-resized crop and rotation compose into one (B, 2, 3) affine matrix per sample, resampled
    bilinearly with zero padding (like torchvision's RandomRotation fill=0), i.e. affine_grid + grid_sample.
    Without rotation the affine is axis-aligned and the resampling separable: two 1-D passes (an
    `embedding_bag` weighted sum of two source lines per output line) with exactly grid_sample's sample points
    and weights, several times faster on a CPU. With rotation the sampling grid is built by broadcasting
    (affine_grid's batched matmul is slower on a CPU than the grid_sample it feeds) and fed to grid_sample.
    A flip on its own is an exact `torch.flip` of the uint8 pixels; with no geometric augmentation nothing
    is resampled;
  * colour jitter = per-sample brightness then contrast factor, each uniform in [1 - x, 1 + x], with the same
    arithmetic and clamping as torchvision's adjust_brightness / adjust_contrast (fixed order, where
    torchvision's ColorJitter shuffles the order per call).
Scaling to [0, 1], brightness and the model's normalisation fold into the resampling weights, so the whole
training path is about ten vectorised passes over the batch, starting from uint8 (no full-size float copy of
the input). Parameters are drawn on the CPU from the trainer's generator, so a seeded run is reproducible on
any device.
"""
from __future__ import annotations

import math
import threading
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
        """Augment float images in [0, 1] (B, C, H, W) with the given parameters; float32 in [0, 1] out."""
        return self._augment(images, params, scale=1.0, mean=0.0, std=1.0)

    def _augment(self, images: torch.Tensor, params: AugmentParams, *, scale: float, mean: float,
                 std: float) -> torch.Tensor:
        """Geometry, then colour, straight into the normalised domain y = (x - mean) / std, x = images * scale.

        Every step is linear in x apart from the clamps, so the input scale, the brightness factor and the
        normalisation fold into the resampling weights (one multiply-add per tap), and torchvision's clamps to
        [0, 1] become clamps to [-mean / std, (1 - mean) / std]; contrast's blend with the image mean keeps
        its form in the normalised domain. About ten passes over the batch in all, each a vectorised op.
        """
        device, count = images.device, len(images)
        low, high = -mean / std, (1 - mean) / std
        gain = torch.full((count,), scale / std)
        if params.brightness is not None:
            gain = gain * params.brightness
        theta, flip, contrast = params.theta, params.flip, params.contrast
        gain, theta, flip, contrast = _on_device(device, gain, theta, flip, contrast)
        bias = torch.full((count,), low, device=device)
        if theta is not None:
            if torch.all(params.theta[:, 0, 1] == 0) and torch.all(params.theta[:, 1, 0] == 0):   # on the CPU
                out = _resample_axis_aligned(images, theta, self.image_size, gain, bias)
            else:
                out = _resample_affine(images, theta, self.image_size, gain, bias)
        else:
            if flip is not None:
                images = _flip_where(images, flip)
            out = torch.addcmul(_per_sample(bias), images, _per_sample(gain))
        if params.brightness is not None:
            out.clamp_(low, high)
        if contrast is not None:
            factor = _per_sample(contrast)
            image_mean = out.mean(dim=(1, 2, 3), keepdim=True)
            out.mul_(factor).add_((1 - factor) * image_mean).clamp_(low, high)
        # Only without resampling can the size still differ; resizing is linear, so normalised values resize
        # exactly as the [0, 1] ones would.
        return self._to_image_size(out)

    def _to_image_size(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] == (self.image_size, self.image_size):
            return images
        return F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                             antialias=True, align_corners=False)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (B, 1, H, W) -> normalized float32 (B, 1, image_size, image_size) on the same device."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (B, 1, H, W), got {images.dtype} {tuple(images.shape)}")
        # Float32 throughout, even under bf16 autocast: the sampling positions would otherwise be rounded to
        # bf16 (about half a pixel at 224 px).
        with torch.autocast(device_type=images.device.type, enabled=False):
            params = None
            if self.training:
                params = self.sample_params(len(images), *images.shape[-2:], generator=generator)
                if params.theta is not None or params.brightness is not None or params.contrast is not None:
                    return self._augment(images, params, scale=1 / 255, mean=self.mean, std=self.std)
                if params.flip is not None:    # a flip alone is exact: it moves uint8 pixels, no arithmetic
                    images = _flip_where(images, *_on_device(images.device, params.flip))
            floats = self._to_image_size(images.float().div_(255))
            return floats.sub_(self.mean).div_(self.std)


# --- resampling kernels ------------------------------------------------------------------------------------

def _on_device(device: torch.device, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """CPU parameter tensors (None passes through) on `device`, in one asynchronous copy from pinned memory:
    copies from pageable memory would each wait for everything queued on the device, which keeps the host
    from running ahead of the accelerator."""
    if device.type == "cpu":
        return list(tensors)
    present = [tensor for tensor in tensors if tensor is not None]
    flat = torch.cat([tensor.reshape(-1).float() for tensor in present])
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    moved, start = [], 0
    for tensor in tensors:
        if tensor is None:
            moved.append(None)
            continue
        part = flat[start:start + tensor.numel()].view(tensor.shape)
        start += tensor.numel()
        moved.append(part > 0.5 if tensor.dtype == torch.bool else part)
    return moved


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values[:, None, None, None]


def _flip_where(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    return torch.where(_per_sample(flip), images.flip(-1), images)


def _sample_positions(scale: torch.Tensor, shift: torch.Tensor, out_size: int, in_size: int) -> torch.Tensor:
    """(B, out_size) input pixel coordinates of output pixel centres along one axis: normalized coordinate
    scale * u + shift, un-normalized exactly as affine_grid + grid_sample do with align_corners=False."""
    u = (torch.arange(out_size, dtype=torch.float32, device=scale.device) * 2 + 1) / out_size - 1
    normalized = scale[:, None] * u + shift[:, None]
    return ((normalized + 1) * in_size - 1) / 2


def _linear_taps(positions: torch.Tensor, size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """1-D bilinear taps of sample positions: (low, high) indices clamped into the image and their weights,
    zero for a tap outside it (grid_sample's padding_mode='zeros')."""
    low = positions.floor()
    frac = positions - low
    low = low.long()
    high = low + 1
    weight_low = (1 - frac) * ((low >= 0) & (low < size))
    weight_high = frac * ((high >= 0) & (high < size))
    return low.clamp(0, size - 1), high.clamp(0, size - 1), weight_low, weight_high


_scratch = threading.local()


def _workspace(name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A float32 scratch tensor reused across calls on the CPU, where a fresh 10 MB intermediate costs more in
    page faults than the pass that fills it (glibc hands large freed blocks back to the kernel); elsewhere a
    fresh tensor (the CUDA caching allocator already reuses memory). Per thread, so concurrent callers never
    share one; never returned to the caller."""
    if device.type != "cpu":
        return torch.empty(shape, device=device)
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get(name)
    if buffer is None or buffer.shape != shape:
        buffer = buffers[name] = torch.empty(shape)
    return buffer


def _bags(low: torch.Tensor, high: torch.Tensor, weight_low: torch.Tensor, weight_high: torch.Tensor,
          channels: int, lines: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags of 2 line numbers into a (B * channels * lines, L) table, one bag per output line of every plane,
    and their weights; taps (B, S) are shared by a sample's channels."""
    count = len(low)
    first = torch.arange(count * channels, device=low.device).view(count, channels, 1) * lines
    index = torch.stack([low[:, None] + first, high[:, None] + first], dim=-1)            # (B, C, S, 2)
    weight = torch.stack([weight_low, weight_high], dim=-1)[:, None].expand(index.shape)
    return index.reshape(-1, 2), weight.reshape(-1, 2)


def _resample_axis_aligned(images: torch.Tensor, theta: torch.Tensor, out_size: int, gain: torch.Tensor,
                           bias: torch.Tensor) -> torch.Tensor:
    """bias + gain * grid_sample(images, affine_grid(theta)) for affines without rotation (crop, flip).

    Bilinear weights of an axis-aligned grid are products of a column weight and a row weight, so the 2-D
    resampling is two 1-D passes, each a weighted sum of two whole source lines per output line: exactly
    what `embedding_bag(mode="sum", per_sample_weights=...)` computes in one vectorised kernel (gathering
    single pixels costs several times more). Columns first, from the transposed input (transposed and
    converted to float in one copy), then rows from the transposed intermediate, so the output comes out in
    the right orientation. Same sample points, weights and zero padding as grid_sample.
    """
    count, channels, height, width = images.shape
    planes = count * channels
    col_low, col_high, col_w_low, col_w_high = _linear_taps(
        _sample_positions(theta[:, 0, 0], theta[:, 0, 2], out_size, width), width)
    row_low, row_high, row_w_low, row_w_high = _linear_taps(
        _sample_positions(theta[:, 1, 1], theta[:, 1, 2], out_size, height), height)

    columns = _workspace("columns", (planes, width, height), images.device)
    columns.copy_(images.reshape(planes, height, width).transpose(1, 2))
    index, weight = _bags(col_low, col_high, col_w_low * gain[:, None], col_w_high * gain[:, None], channels, width)
    by_columns = F.embedding_bag(index, columns.view(planes * width, height), mode="sum",
                                 per_sample_weights=weight)                                  # (P * S, H)
    rows = _workspace("rows", (planes, height, out_size), images.device)
    rows.copy_(by_columns.view(planes, out_size, height).transpose(1, 2))
    del by_columns
    index, weight = _bags(row_low, row_high, row_w_low, row_w_high, channels, height)
    out = F.embedding_bag(index, rows.view(planes * height, out_size), mode="sum",
                          per_sample_weights=weight)                                          # (P * S, S)
    return out.view(count, channels, out_size, out_size).add_(_per_sample(bias))


def _affine_grid(theta: torch.Tensor, out_size: int) -> torch.Tensor:
    """F.affine_grid(theta, (B, C, S, S), align_corners=False) as two broadcast multiply-adds: on the CPU,
    affine_grid's (B, S*S, 3) @ (B, 3, 2) batched matmul takes longer than the grid_sample it feeds."""
    u = (torch.arange(out_size, dtype=torch.float32, device=theta.device) * 2 + 1) / out_size - 1
    grid = torch.empty((len(theta), out_size, out_size, 2), device=theta.device)
    for axis in range(2):
        along_x = theta[:, axis, 0, None] * u                        # (B, S): varies along output columns
        along_y = theta[:, axis, 1, None] * u + theta[:, axis, 2, None]
        torch.add(along_x[:, None, :], along_y[:, :, None], out=grid[..., axis])
    return grid


def _resample_affine(images: torch.Tensor, theta: torch.Tensor, out_size: int, gain: torch.Tensor,
                     bias: torch.Tensor) -> torch.Tensor:
    """bias + gain * grid_sample(images, affine_grid(theta)): bilinear, zero padding (rotations)."""
    grid = _affine_grid(theta, out_size)
    sampled = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled.mul_(_per_sample(gain)).add_(_per_sample(bias))
