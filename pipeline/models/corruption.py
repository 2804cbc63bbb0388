"""The denoising autoencoder's corruptions, shared with evaluation (robustness) and the report's figures."""

from __future__ import annotations

import torch


def gaussian_noise(x: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + std * eps with eps ~ N(0, I)."""
    noise = torch.randn(x.shape, generator=generator).to(x.device) if generator else torch.randn_like(x)
    return x + std * noise


def mask_pixels(x: torch.Tensor, drop_prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x with each pixel set to 0 independently with probability drop_prob."""
    uniform = torch.rand(x.shape, generator=generator).to(x.device) if generator else torch.rand_like(x)
    return x * (uniform >= drop_prob)
