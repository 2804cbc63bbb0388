"""`vae`: the variational autoencoder with a beta-weighted KL (beta = 1 is the plain VAE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import number
from pipeline.models.contract import Capabilities
from pipeline.models.gaussian import GaussianAutoencoder
from pipeline.models.losses import kl_divergence, objective


@dataclass(frozen=True)
class VAESettings:
    beta: float = 1.0  # weight of the KL term in the training objective

    def label(self) -> str:
        return f"β={self.beta:g}"


class VAE(GaussianAutoencoder):
    family = "vae"
    capabilities = Capabilities(posterior=True, likelihood_bound=True)
    Settings = VAESettings

    @staticmethod
    def parse_settings(raw: dict, where: str) -> VAESettings:
        return VAESettings(beta=number(raw.get("beta", VAESettings.beta), f"{where}.beta", low=0.0))

    @staticmethod
    def is_plain(settings: VAESettings) -> bool:
        return settings.beta == 1.0

    def loss_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self(x)
        recon = self.reconstruction(out.logits, x)
        kl = kl_divergence(out.code, out.logvar)
        return {"recon": recon, "kl": kl, "loss": objective(recon, kl, self.settings.beta)}
