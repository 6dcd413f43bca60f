"""Random changes of glyphs for training: small shifts, rotations, scaling, and noise; no mirror.

A mirrored letter is another glyph (or none), so flips are never used here. Each image gets
its own shift, angle and scale, drawn from the training generator, so augmentation is seeded,
resumable and the same on every machine (bilinear resampling with ATen's pinned kernels).
Gaussian noise, on a share of the images, teaches the model to look past speckle that the clean
glyphs never show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class Affine:
    """The largest change: shift (pixels), rotation (degrees), scale (a fraction: 0.1 is 10%)."""

    shift_px: float = 0.0
    rotate_deg: float = 0.0
    scale: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.shift_px or self.rotate_deg or self.scale)


def matrices(u: torch.Tensor, a: Affine, size: int = 28) -> torch.Tensor:
    """(N, 2, 3) sampling matrices for affine_grid from uniform draws u (N, 4) in [-1, 1]."""
    angle = u[:, 2] * math.radians(a.rotate_deg)
    scale = 1 + u[:, 3] * a.scale
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift = u[:, :2] * a.shift_px * 2 / size  # affine_grid's coordinates span 2 over the image
    return torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample images x (N, H, W) in [-1, 1] with matrices theta; outside is background (-1)."""
    n, h, w = x.shape
    grid = F.affine_grid(theta.to(x), [n, 1, h, w], align_corners=False)
    out = F.grid_sample(
        (x + 1).unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out.squeeze(1) - 1


def random_affine(x: torch.Tensor, a: Affine, generator: torch.Generator) -> torch.Tensor:
    """Each image of x (N, 28, 28) changed by its own draw within `a`."""
    u = torch.rand(len(x), 4, generator=generator) * 2 - 1
    return warp(x, matrices(u, a, x.shape[-1]))


def random_noise(x: torch.Tensor, largest: float, share: float, generator) -> torch.Tensor:
    """Gaussian noise on a random share of x (N, 28, 28) in [-1, 1], each image's standard
    deviation drawn uniformly up to `largest` (in that scale: 0.6 is 0.3 of the 0-255 range),
    then clipped to [-1, 1]."""
    n = len(x)
    picked = torch.rand(n, generator=generator) < share
    std = torch.rand(n, generator=generator) * largest * picked
    noise = torch.randn(x.shape, generator=generator) * std[:, None, None]
    return (x + noise.to(x)).clamp_(-1, 1)
