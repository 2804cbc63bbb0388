"""How a family generates: a sampler turns noise it draws into latents its decoder reads. Every consumer
(evaluation, figures, the app, the FID probe) asks the model for noise (`sample_noise`) and for the
decoding of that noise (`decode_noise`); none builds latents itself.

A sampler is a module, so what it fitted is saved with the model's weights.
"""

from __future__ import annotations

import torch
from torch import nn


class StandardNormal(nn.Module):
    """The prior N(0, I) a family was trained with (VAE, GAN): its noise is the latent itself."""

    label = "prior N(0, I)"
    ex_post = False  # nothing to fit after training

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def noise(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(count, self.latent_dim, generator=generator)

    def latent(self, noise: torch.Tensor) -> torch.Tensor:
        return noise


class FittedGaussian(StandardNormal):
    """Ex-post density estimation for a family trained without a prior (the plain autoencoders): N(mean, cov)
    fitted to the codes of the training images once training ends; standard-normal noise is mapped through
    it, so that the same noise generates from every family."""

    label = "ex-post Gaussian"
    ex_post = True

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        self.register_buffer("mean", torch.zeros(latent_dim))
        self.register_buffer("scale_tril", torch.eye(latent_dim))

    def latent(self, noise: torch.Tensor) -> torch.Tensor:
        return self.mean + noise @ self.scale_tril.T

    @torch.no_grad()
    def fit(self, codes: torch.Tensor) -> None:
        """N(mean, cov) of the codes, with a jitter of 1e-6 of the mean variance on the diagonal."""
        codes = codes.double()
        centred = codes - codes.mean(0)
        covariance = centred.T @ centred / max(1, len(codes) - 1)
        jitter = (
            1e-6
            * covariance.diagonal().mean().clamp_min(1e-12)
            * torch.eye(self.latent_dim, dtype=codes.dtype, device=codes.device)
        )
        self.mean.copy_(codes.mean(0))
        self.scale_tril.copy_(torch.linalg.cholesky(covariance + jitter))
