"""`gan`: the VAE's decoder network as a generator G(z), z ~ N(0, I), trained against a discriminator that
is the encoder network of the same arch with a single real/fake logit (pipeline/models/adversarial.py).

Each batch is one discriminator step on the real images against G(z), then one generator step on the same
G(z) against the updated discriminator (non-saturating loss). A GAN has no encoder, so no reconstructions,
codes, KL or likelihood bound; it is scored on its samples. With `init_from` (a fine-tuned cell) the
generator starts as a trained VAE's decoder, weight for weight, and with `init_discriminator` the
discriminator starts from that VAE's encoder (all but its output layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.models import adversarial
from pipeline.models.adversarial import AdversarialSettings, frozen
from pipeline.models.contract import Autoencoder, Capabilities, ModelOutput, descend
from pipeline.models.samplers import StandardNormal


@dataclass(frozen=True)
class GANSettings(AdversarialSettings):
    def label(self) -> str:
        return ", ".join(adversarial.adversarial_label(self))


class GAN(Autoencoder):
    family = "gan"
    capabilities = Capabilities(posterior=False, likelihood_bound=False, encoder=False, adversarial=True)
    Sampler = StandardNormal  # the generator's prior
    suggested = {"lr": 0.0002}  # DCGAN's Adam rate, below the autoencoders' default
    Settings = GANSettings

    @staticmethod
    def parse_settings(raw: dict, where: str) -> GANSettings:
        return GANSettings(**adversarial.parse_adversarial(raw, where))

    @staticmethod
    def encoder_outputs(latent_dim: int) -> int:
        return 1  # the discriminator's real/fake logit

    @property
    def discriminator(self) -> torch.nn.Module:
        return self.encoder

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError("a GAN has no encoder: it maps z to images, not images to codes")

    def forward(self, x: torch.Tensor) -> ModelOutput:
        raise TypeError("a GAN has no encoder: it maps z to images, not images to codes")

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """G(z): the decoder's mean image, in [0, 1] like the real digits."""
        return torch.sigmoid(self.decode(z))

    def make_optimizer(self, lr: float, betas=None, eps=None) -> torch.optim.Optimizer:
        """Its own Adam (adversarial.make_adversarial_optimizer); the config refuses adam_betas and adam_eps."""
        return adversarial.make_adversarial_optimizer([self.decoder], self.discriminator, lr, self.settings)

    def generator_step(self, fake: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """One step of the generator on -log D(G(z)) with the discriminator frozen; its per-image loss."""
        with frozen(self.discriminator):
            loss = adversarial.generator_loss(self.discriminator(fake).squeeze(1))
            descend(optimizer, loss.mean())
        return loss.detach()

    def train_step(self, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        fake = self.generate(torch.randn(len(x), self.latent_dim, device=x.device))
        terms = adversarial.discriminator_step(self.discriminator, optimizer, x, [fake], self.settings.r1_weight)
        terms["g_loss"] = self.generator_step(fake, optimizer)
        return {**terms, "loss": terms["d_loss"] + terms["g_loss"]}

    def loss_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fake = self.generate(torch.randn(len(x), self.latent_dim, device=x.device))
        terms = adversarial.game_terms(self.discriminator, x, [fake])
        return {**terms, "loss": terms["d_loss"] + terms["g_loss"]}

    starts_from = ("vae",)

    def start_from(self, vae: Autoencoder) -> None:
        """The generator becomes the VAE's decoder (same module, same shapes); optionally the discriminator
        its encoder, but for the output layer."""
        self.decoder.load_state_dict(vae.decoder.state_dict())
        if self.settings.init_discriminator:
            adversarial.copy_body(vae.encoder, self.discriminator)
