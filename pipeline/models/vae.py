"""`vae`: the variational autoencoder with a beta-weighted KL (beta = 1 is the plain VAE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import number
from pipeline.models.contract import Autoencoder, Capabilities, ModelOutput
from pipeline.models.losses import kl_divergence, objective


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I): a sample whose gradient reaches mu and log sigma^2."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


@dataclass(frozen=True)
class VAESettings:
    beta: float = 1.0  # weight of the KL term in the training objective

    def label(self) -> str:
        return f"β={self.beta:g}"


class VAE(Autoencoder):
    family = "vae"
    capabilities = Capabilities(posterior=True, prior=True, likelihood_bound=True)
    Settings = VAESettings

    @staticmethod
    def encoder_outputs(latent_dim: int) -> int:
        return 2 * latent_dim

    @staticmethod
    def parse_settings(raw: dict, where: str) -> VAESettings:
        return VAESettings(beta=number(raw.get("beta", VAESettings.beta), f"{where}.beta", low=0.0))

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

    def loss_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self(x)
        recon = self.reconstruction(out.logits, x)
        kl = kl_divergence(out.code, out.logvar)
        return {"recon": recon, "kl": kl, "loss": objective(recon, kl, self.settings.beta)}

    def epoch_metrics(self, means: dict[str, float]) -> dict[str, float]:
        return {**means, "elbo": means["recon"] + means["kl"]}
