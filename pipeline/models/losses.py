"""Loss terms of the families, per image. Pure functions of tensors.

Following the study's convention, `elbo` is the negative evidence lower bound, reconstruction + KL
(lower is better), and the VAE's training objective is reconstruction + beta * KL.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reconstruction_nats(
    logits: torch.Tensor, x: torch.Tensor, likelihood: str, gaussian_std: float = 0.1
) -> torch.Tensor:
    """-log p(x|z) summed over pixels, one value per image.

    bernoulli: binary cross-entropy on the logits, with pixel intensities in [0, 1] as targets.
    gaussian: N(x; sigmoid(logits), gaussian_std^2) per pixel.
    """
    flat_logits, flat_x = logits.flatten(1), x.flatten(1)
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(flat_logits, flat_x, reduction="none").sum(1)
    if likelihood == "gaussian":
        squared = (torch.sigmoid(flat_logits) - flat_x).pow(2).sum(1)
        pixels = flat_x.shape[1]
        return squared / (2 * gaussian_std**2) + pixels * (math.log(gaussian_std) + 0.5 * math.log(2 * math.pi))
    raise ValueError(f"unknown likelihood {likelihood!r}")


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) for each image and latent dimension, in closed form."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || p(z)) per image."""
    return kl_per_dim(mu, logvar).sum(1)


def objective(recon: torch.Tensor, kl: torch.Tensor, beta: float) -> torch.Tensor:
    """The beta-VAE training loss per image: reconstruction + beta * KL (beta = 1 gives the negative ELBO)."""
    return recon + beta * kl


def squared_error(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the pixels of each image between the decoder's mean sigmoid(logits) and x."""
    return (torch.sigmoid(logits.flatten(1)) - x.flatten(1)).pow(2).mean(1)
