"""`vaegan`: the VAE trained with an adversarial term on its decoder's outputs (Larsen et al., 2016).

Three players: the VAE's encoder and decoder, and a discriminator built like the encoder with one logit.
Per batch, as in the paper's Algorithm 1:
- the discriminator steps on real images against the reconstructions Dec(z ~ q(z|x)) and the prior
  samples Dec(z ~ N(0, I)) (both count as fake);
- with the discriminator frozen, the encoder steps on beta * KL + reconstruction and the decoder on
  gamma * reconstruction + the non-saturating GAN loss of both fakes (the encoder gets no GAN gradient).
`recon_space: features` (the paper's choice) measures reconstruction as 1/2 ||f(x) - f(x~)||^2 in the
discriminator's last hidden layer f (a unit-variance Gaussian there, up to a constant); `pixels` uses the
cell's likelihood on pixels, as a VAE does. The reported `recon`, `kl` and `elbo` are always the pixel-space
VAE quantities, so they compare with the VAE's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import choice, number
from pipeline.models import adversarial
from pipeline.models.adversarial import AdversarialSettings, frozen
from pipeline.models.contract import Autoencoder, Capabilities
from pipeline.models.gaussian import GaussianAutoencoder, reparameterize
from pipeline.models.losses import kl_divergence
from pipeline.models.networks import build_networks

RECON_SPACES = ("features", "pixels")


@dataclass(frozen=True)
class VAEGANSettings(AdversarialSettings):
    beta: float = 1.0  # weight of the KL in the encoder's loss
    recon_space: str = "features"  # features (of the discriminator, as in the paper) or pixels
    gamma: float = 1.0  # weight of the reconstruction against the GAN loss in the decoder's loss

    def label(self) -> str:
        return ", ".join(
            [f"β={self.beta:g}", self.recon_space, f"γ={self.gamma:g}", *adversarial.adversarial_label(self)]
        )


class VAEGAN(GaussianAutoencoder):
    family = "vaegan"
    capabilities = Capabilities(posterior=True, likelihood_bound=True, adversarial=True)
    Settings = VAEGANSettings

    def __init__(self, cell):
        super().__init__(cell)
        self.discriminator, _ = build_networks(
            cell.arch, 1, cell.latent_dim, cell.hidden, cell.channels, cell.activation
        )

    @staticmethod
    def parse_settings(raw: dict, where: str) -> VAEGANSettings:
        return VAEGANSettings(
            **adversarial.parse_adversarial(raw, where),
            beta=number(raw.get("beta", VAEGANSettings.beta), f"{where}.beta", low=0.0),
            recon_space=choice(
                raw.get("recon_space", VAEGANSettings.recon_space), f"{where}.recon_space", RECON_SPACES
            ),
            gamma=number(raw.get("gamma", VAEGANSettings.gamma), f"{where}.gamma", low=0.0),
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The discriminator's last hidden layer: the space `recon_space: features` reconstructs in."""
        return adversarial.feature_extractor(self.discriminator)(images)

    def make_optimizer(self, lr: float, betas=None, eps=None) -> torch.optim.Optimizer:
        """Its own Adam (adversarial.make_adversarial_optimizer); the config refuses adam_betas and adam_eps."""
        return adversarial.make_adversarial_optimizer(
            [self.encoder, self.decoder], self.discriminator, lr, self.settings
        )

    def fakes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """mu, logvar, the reconstruction logits, and the two fakes: reconstructions and prior samples."""
        mu, logvar = self.posterior(x)
        logits = self.decode(reparameterize(mu, logvar))
        prior = torch.sigmoid(self.decode(torch.randn_like(mu)))
        return mu, logvar, logits, [torch.sigmoid(logits), prior]

    def player_terms(
        self, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, logits: torch.Tensor, reconstructed: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The encoder's and decoder's per-image terms but the GAN loss: pixel reconstruction under the cell's
        likelihood, KL, and with recon_space features the reconstruction in the discriminator's features."""
        terms = {"recon": self.reconstruction(logits, x), "kl": kl_divergence(mu, logvar)}
        if self.settings.recon_space == "features":
            terms["feature_recon"] = 0.5 * (self.features(reconstructed) - self.features(x).detach()).pow(2).sum(1)
        return terms

    def recon_used(self, terms: dict) -> torch.Tensor:
        return terms.get("feature_recon", terms["recon"])

    def encoder_loss(self, terms: dict) -> torch.Tensor:
        return self.settings.beta * terms["kl"] + self.recon_used(terms)

    def decoder_loss(self, terms: dict) -> torch.Tensor:
        return self.settings.gamma * self.recon_used(terms) + terms["g_loss"]

    def train_step(self, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        mu, logvar, logits, fakes = self.fakes(x)
        d_terms = adversarial.discriminator_step(self.discriminator, optimizer, x, fakes, self.settings.r1_weight)
        with frozen(self.discriminator):
            terms = self.player_terms(x, mu, logvar, logits, fakes[0])
            terms["g_loss"] = sum(adversarial.generator_loss(self.discriminator(fake).squeeze(1)) for fake in fakes)
            # Each player descends its own loss (the encoder gets no GAN gradient), in one optimizer step.
            encoder_params, decoder_params = list(self.encoder.parameters()), list(self.decoder.parameters())
            encoder_grads = torch.autograd.grad(self.encoder_loss(terms).mean(), encoder_params, retain_graph=True)
            decoder_grads = torch.autograd.grad(self.decoder_loss(terms).mean(), decoder_params)
            optimizer.zero_grad(set_to_none=True)
            for param, grad in zip(encoder_params + decoder_params, encoder_grads + decoder_grads):
                param.grad = grad
            optimizer.step()
        terms = {key: value.detach() for key, value in terms.items()} | d_terms
        return terms | {"loss": self.encoder_loss(terms) + self.decoder_loss(terms)}

    def loss_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mu, logvar, logits, fakes = self.fakes(x)
        terms = self.player_terms(x, mu, logvar, logits, fakes[0]) | adversarial.game_terms(
            self.discriminator, x, fakes
        )
        return terms | {"loss": self.encoder_loss(terms) + self.decoder_loss(terms)}

    starts_from = ("vae",)

    def start_from(self, vae: Autoencoder) -> None:
        """Encoder and decoder from a trained VAE; optionally the discriminator from its encoder's body."""
        self.encoder.load_state_dict(vae.encoder.state_dict())
        self.decoder.load_state_dict(vae.decoder.state_dict())
        if self.settings.init_discriminator:
            adversarial.copy_body(vae.encoder, self.discriminator)
