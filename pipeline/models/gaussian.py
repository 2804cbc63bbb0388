"""The Gaussian posterior q(z|x) = N(mu(x), diag sigma^2(x)) that the VAE and the VAE-GAN share: the encoder
outputs mu and log sigma^2, and the decoder reads a reparameterised sample."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.models.contract import Autoencoder, ModelOutput
from pipeline.models.losses import reconstruction_nats
from pipeline.models.samplers import StandardNormal


def iw_nll(log_weights: torch.Tensor) -> torch.Tensor:
    """-log of the mean of K importance weights, from their logs (K, N): per image."""
    return -(torch.logsumexp(log_weights, dim=0) - math.log(len(log_weights)))


@dataclass
class ImportanceSamples:
    log_px_z: torch.Tensor  # (K, N)
    log_pz: torch.Tensor  # (K, N)
    log_qz: torch.Tensor  # (K, N)
    mu: torch.Tensor  # (N, D): q(z|x)'s mean and log-variance
    logvar: torch.Tensor

    def log_weights(self) -> torch.Tensor:
        return self.log_px_z + self.log_pz - self.log_qz


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I): a sample whose gradient reaches mu and log sigma^2."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


class GaussianAutoencoder(Autoencoder):
    """An autoencoder whose code is the mean of a Gaussian posterior, trained with the prior N(0, I); its
    epochs report the ELBO."""

    Sampler = StandardNormal

    @staticmethod
    def encoder_outputs(latent_dim: int) -> int:
        return 2 * latent_dim

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian q(z|x): its mean and log-variance."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]

    def forward(self, x: torch.Tensor) -> ModelOutput:
        mu, logvar = self.posterior(x)
        z = reparameterize(mu, logvar)
        return ModelOutput(logits=self.decode(z), code=mu, z=z, logvar=logvar)

    def epoch_metrics(self, means: dict[str, float]) -> dict[str, float]:
        return {**means, "elbo": means["recon"] + means["kl"]}

    def importance_samples(self, x: torch.Tensor, k: int) -> ImportanceSamples:
        """K reparameterised posterior samples z_k of each image, with log p(x|z_k), log p(z_k), log q(z_k|x)."""
        mu, logvar = self.posterior(x)
        std = torch.exp(0.5 * logvar)
        z = mu + std * torch.randn(k, *mu.shape, device=mu.device)  # (K, N, D)
        logits = self.decode(z.flatten(0, 1)).view(k, len(x), *x.shape[1:])
        log_px_z = -reconstruction_nats(
            logits.flatten(0, 1), x.repeat(k, 1, 1, 1), self.likelihood, self.gaussian_std
        ).view(k, -1)
        log_pz = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_qz = (-0.5 * ((z - mu) / std).pow(2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)
        return ImportanceSamples(log_px_z, log_pz, log_qz, mu, logvar)

    def log_weights(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """log p(x|z_k) + log p(z_k) - log q(z_k|x) for K posterior samples z_k of each image: (K, N)."""
        return self.importance_samples(x, k).log_weights()

    def nll_bound(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """-log p(x) estimated with K importance samples from q(z|x) (Burda et al., 2016), nats per image:
        log p(x) >= log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x); K = 1 is the ELBO, and the bound tightens as
        K grows."""
        return iw_nll(self.log_weights(x, k))
