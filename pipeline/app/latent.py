"""The latent explorer's arithmetic: pure functions of codes and models."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.models import Autoencoder


def principal_axes(codes: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean (D,), directions (count, D), standard deviations (count,)) of the codes along their first
    `count` principal directions, largest variance first."""
    mean = codes.mean(0)
    _, singular, directions = torch.linalg.svd(codes - mean, full_matrices=False)
    scales = singular / max(len(codes) - 1, 1) ** 0.5
    return mean, directions[:count], scales[:count]


def point_on_axes(
    mean: torch.Tensor, directions: torch.Tensor, scales: torch.Tensor, offsets: list[float]
) -> torch.Tensor:
    """The code (1, D) at `offsets` standard deviations along each principal direction from the mean."""
    shift = (torch.tensor(offsets, dtype=mean.dtype)[:, None] * scales[:, None] * directions).sum(0)
    return (mean + shift)[None]


def line_between(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` evenly spaced codes (steps, D) from a to b, both ends included."""
    weights = torch.linspace(0, 1, steps)[:, None]
    return (1 - weights) * a.reshape(1, -1) + weights * b.reshape(1, -1)


@torch.no_grad()
def decode(model: Autoencoder, z: torch.Tensor) -> np.ndarray:
    """Pixel means (N, 28, 28) in [0, 1] of the codes z (N, latent_dim)."""
    return _pixel_means(model, model.decode, z)


@torch.no_grad()
def decode_noise(model: Autoencoder, noise: torch.Tensor) -> np.ndarray:
    """The samples `noise` (from the model's sample_noise) stands for, as pixel means."""
    return _pixel_means(model, model.decode_noise, noise)


def _pixel_means(model: Autoencoder, decoder, inputs: torch.Tensor) -> np.ndarray:
    model.eval()
    return torch.sigmoid(decoder(inputs.to(model.device))).squeeze(1).cpu().numpy()
