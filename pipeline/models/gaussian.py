"""The Gaussian posterior q(z|x) = N(mu(x), diag sigma^2(x)) that the VAE and the VAE-GAN share: the encoder
outputs mu and log sigma^2, and the decoder reads a reparameterised sample."""

from __future__ import annotations

import torch

from pipeline.models.contract import Autoencoder, ModelOutput


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I): a sample whose gradient reaches mu and log sigma^2."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


class GaussianAutoencoder(Autoencoder):
    """An autoencoder whose code is the mean of a Gaussian posterior; its epochs report the ELBO."""

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
