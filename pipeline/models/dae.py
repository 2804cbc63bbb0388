"""`dae`: the denoising autoencoder, trained to reconstruct the clean image from a corrupted one
(Vincent et al., 2008): additive Gaussian noise of standard deviation `noise_std` (not clipped), or
masking noise that sets each pixel to 0 with probability `mask_prob`. The corruption is drawn afresh
for every batch, in training and in validation alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import ConfigError, choice, number, probability
from pipeline.models.contract import DETERMINISTIC, Autoencoder
from pipeline.models.corruption import gaussian_noise, mask_pixels

NOISES = ("gaussian", "mask")


@dataclass(frozen=True)
class DAESettings:
    noise: str = "gaussian"
    noise_std: float | None = 0.5  # noise: gaussian only (None otherwise)
    mask_prob: float | None = None  # noise: mask only, 0.25 unless set

    def label(self) -> str:
        return f"σ={self.noise_std:g}" if self.noise == "gaussian" else f"mask p={self.mask_prob:g}"


class DAE(Autoencoder):
    family = "dae"
    capabilities = DETERMINISTIC
    Settings = DAESettings

    @staticmethod
    def parse_settings(raw: dict, where: str) -> DAESettings:
        noise = choice(raw.get("noise", DAESettings.noise), f"{where}.noise", NOISES)
        unused = "mask_prob" if noise == "gaussian" else "noise_std"
        if unused in raw:
            raise ConfigError(f"{where}.{unused} does not apply to noise: {noise}; remove it or change noise")
        if noise == "gaussian":
            return DAESettings(noise, noise_std=number(raw.get("noise_std", 0.5), f"{where}.noise_std", low=0.0))
        return DAESettings(
            noise, noise_std=None, mask_prob=probability(raw.get("mask_prob", 0.25), f"{where}.mask_prob")
        )

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        if self.settings.noise == "gaussian":
            return gaussian_noise(x, self.settings.noise_std)
        return mask_pixels(x, self.settings.mask_prob)

    def loss_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        recon = self.reconstruction(self(self.corrupt(x)).logits, x)
        return {"recon": recon, "loss": recon}
