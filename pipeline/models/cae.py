"""`cae`: the contractive autoencoder (Rifai et al., 2011): reconstruction + lambda * ||dh/dx||_F^2, the
squared Frobenius norm of the encoder's Jacobian at each training image.

The penalty is exact for the linear arch with one hidden layer (closed form, see models/jacobian.py),
exact by autograd for deeper MLPs (one backward pass per code dimension), and an unbiased
one-projection estimate for the conv encoder, where the exact Jacobian costs latent_dim backward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import number
from pipeline.models import jacobian
from pipeline.models.contract import DETERMINISTIC, Autoencoder


@dataclass(frozen=True)
class CAESettings:
    contraction_weight: float = 0.1  # lambda

    def label(self) -> str:
        return f"λ={self.contraction_weight:g}"


class CAE(Autoencoder):
    family = "cae"
    capabilities = DETERMINISTIC
    Settings = CAESettings

    @staticmethod
    def parse_settings(raw: dict, where: str) -> CAESettings:
        weight = raw.get("contraction_weight", CAESettings.contraction_weight)
        return CAESettings(contraction_weight=number(weight, f"{where}.contraction_weight", low=0.0))

    @property
    def loss_differentiates_input(self) -> bool:
        return not (self.arch == "linear" and len(self.hidden) == 1 and self.activation == "relu")

    def contraction_sq(self, x: torch.Tensor) -> torch.Tensor:
        """||dh/dx||_F^2 per image, as the module docstring says."""
        if not self.loss_differentiates_input:
            layers = self.encoder[1]
            return jacobian.frobenius_sq_relu_mlp(x.flatten(1), layers[0], layers[2])
        if self.arch == "linear":
            return jacobian.frobenius_sq_exact(self.encode, x)
        return jacobian.frobenius_sq_projection(self.encode, x)

    def loss_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        recon = self.reconstruction(self(x).logits, x)
        contraction = self.contraction_sq(x)
        return {
            "recon": recon,
            "contraction": contraction,
            "loss": recon + self.settings.contraction_weight * contraction,
        }
