"""`iwae`: the importance-weighted autoencoder (Burda, Grosse & Salakhutdinov, 2016): the VAE's networks
trained on the K-sample bound log (1/K) sum_k p(x, z_k) / q(z_k|x) instead of the ELBO (K = 1 is the VAE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import integer
from pipeline.models.contract import Capabilities
from pipeline.models.gaussian import GaussianAutoencoder, iw_nll
from pipeline.models.losses import kl_divergence


@dataclass(frozen=True)
class IWAESettings:
    k: int = 5  # importance samples per image in the training objective

    def label(self) -> str:
        return f"k={self.k}"


class IWAE(GaussianAutoencoder):
    family = "iwae"
    capabilities = Capabilities(posterior=True, likelihood_bound=True)
    Settings = IWAESettings

    @staticmethod
    def parse_settings(raw: dict, where: str) -> IWAESettings:
        return IWAESettings(k=integer(raw.get("k", IWAESettings.k), f"{where}.k", low=1))

    def loss_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """`loss`: the negative K-sample bound; `recon` (the mean over the K samples) and the analytic `kl` make
        the ELBO the epochs report beside it."""
        samples = self.importance_samples(x, self.settings.k)
        recon = -samples.log_px_z.mean(0)
        kl = kl_divergence(samples.mu, samples.logvar)
        return {"recon": recon, "kl": kl, "loss": iw_nll(samples.log_weights())}
