"""The contract every model family follows, so that training, evaluation, figures and the report ask a
model what it has instead of assuming a VAE.

A family is a subclass of `Autoencoder` with:
- `family`: its name in params.yaml; `Settings`: a frozen dataclass of its own settings with defaults,
  read by `parse_settings` (only these keys may appear on a cell of that family);
- `capabilities`: what evaluation may compute for it (KL, ELBO, the likelihood bound) and how it is fitted;
- `Sampler`: how it generates (samplers.py): its prior, or a distribution fitted to its training codes;
- `networks(cell)`: its encoder and decoder (by default the shared ones of networks.py);
- `encode(x)`: the deterministic code h (the posterior mean for a VAE); `forward(x)`: a `ModelOutput`;
- `loss_terms(x)`: per-image loss terms in a dict; the engine reports the mean of every term each epoch,
  and `train_step` (one gradient step on the mean of `loss`, unless a family overrides it, as the
  adversarial families do with alternating steps) is what the engine calls for every batch; a family
  fitted in one pass (`capabilities.one_pass`) provides `fit(images)` instead;
- `own_metrics(images)` and `OWN_METRICS`: test metrics only the family has, with their descriptions;
- `check_cell(cell, train_images)`: what a cell of the family must satisfy beyond its settings.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from pipeline.models.losses import reconstruction_nats
from pipeline.models.networks import IMAGE_SIZE, build_networks
from pipeline.models.samplers import FittedGaussian

if TYPE_CHECKING:
    from pipeline.config import CellConfig


@dataclass(frozen=True)
class Capabilities:
    posterior: bool  # a Gaussian q(z|x): KL, active units and KL per dimension
    likelihood_bound: bool  # the ELBO and the importance-weighted bound on log p(x) (`nll_bound`)
    encoder: bool = True  # images to codes: reconstructions, codes, contraction, interpolation between digits
    adversarial: bool = False  # trained against a discriminator: D/G curves and a per-epoch sample-quality probe
    # The decoder reads any point of code space, so interpolation, the 2-D latent map, the encoder's
    # contraction and the app's sliders apply (not for a code quantised to a codebook).
    continuous_code: bool = True
    one_pass: bool = False  # fitted in closed form by `fit(images)`: one pass over the training images, no steps
    baseline: bool = False  # a reference the autoencoders are read against (the report's baseline question)


DETERMINISTIC = Capabilities(posterior=False, likelihood_bound=False)  # a code, no distribution


@dataclass
class ModelOutput:
    logits: torch.Tensor  # decoder logits, (N, 1, 28, 28)
    code: torch.Tensor  # (N, latent_dim): the posterior mean for a VAE, the deterministic code otherwise
    z: torch.Tensor  # the latent the decoder read: a posterior sample for a VAE, the code otherwise
    logvar: torch.Tensor | None = None  # log sigma^2 of q(z|x), families with a posterior only


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One gradient step on `loss` (parameters without a gradient, such as a frozen player's, stay put)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@dataclass(frozen=True)
class NoSettings:
    """A family without settings of its own."""

    def label(self) -> str:
        return ""


class Autoencoder(nn.Module):
    family: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    Settings: ClassVar[type] = NoSettings
    Sampler: ClassVar[type] = FittedGaussian  # a family trained with a prior sets StandardNormal
    suggested: ClassVar[dict] = {}  # cell keys a new cell of the family is best started with (the app's form)
    OWN_METRICS: ClassVar[dict[str, str]] = {}  # test metrics only this family reports: name -> description

    def __init__(self, cell: CellConfig):
        super().__init__()
        self.encoder, self.decoder = self.networks(cell)
        self.arch, self.hidden, self.activation = cell.arch, cell.hidden, cell.activation
        self.latent_dim = cell.latent_dim
        self.likelihood, self.gaussian_std = cell.likelihood, cell.gaussian_std
        self.settings = cell.settings
        self.sampler = self.make_sampler(cell)

    @staticmethod
    def parse_settings(raw: dict, where: str):
        return NoSettings()

    # Families whose trained models a fine-tuned cell of this family may start from (`start_from`).
    starts_from: ClassVar[tuple[str, ...]] = ()

    @staticmethod
    def is_plain(settings) -> bool:
        """Whether the settings make the family's plain member, the one compared with other families (a VAE
        with β = 1, not the β sweep's other members)."""
        return True

    @classmethod
    def starting_settings(cls) -> dict:
        """The family's settings with their defaults, and the keys it suggests: where a new cell starts."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls.Settings) if f.default is not None}
        return {**defaults, **cls.suggested}

    @classmethod
    def check_cell(cls, cell: CellConfig, train_images: int) -> None:
        """Refuse (ConfigError) a cell the family cannot train, beyond what `parse_settings` checks."""

    def make_sampler(self, cell: CellConfig) -> nn.Module:
        return self.Sampler(cell.latent_dim)

    def networks(self, cell: CellConfig) -> tuple[nn.Module, nn.Module]:
        """The encoder and decoder: the shared networks of the cell's arch, the encoder built first."""
        return build_networks(
            cell.arch,
            self.encoder_outputs(cell.latent_dim),
            cell.latent_dim,
            cell.hidden,
            cell.channels,
            cell.activation,
        )

    @property
    def device(self) -> torch.device:
        """Where the model's tensors are (a family fitted in one pass has buffers and no parameters)."""
        return next(itertools.chain(self.parameters(), self.buffers())).device

    @staticmethod
    def encoder_outputs(latent_dim: int) -> int:
        """Numbers the encoder network gives per image (2 x latent_dim for a mean and a log-variance)."""
        return latent_dim

    def make_optimizer(
        self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> torch.optim.Optimizer | None:
        """Adam on every parameter; None for a family fitted in one pass."""
        return None if self.capabilities.one_pass else torch.optim.Adam(self.parameters(), lr=lr, betas=betas, eps=eps)

    def fit(self, images: torch.Tensor) -> None:
        """Fit in closed form on the training images (families with `capabilities.one_pass`)."""
        raise NotImplementedError(f"family {self.family} is trained by gradient steps, not fitted in one pass")

    def train_step(self, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """One training step on a batch; returns its per-image loss terms."""
        terms = self.loss_terms(x)
        descend(optimizer, terms["loss"].mean())
        return terms

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).view(-1, 1, IMAGE_SIZE, IMAGE_SIZE)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        code = self.encode(x)
        return ModelOutput(logits=self.decode(code), code=code, z=code)

    def reconstruction(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x|z) per image under the cell's likelihood (Gaussian = squared error up to scale and constant)."""
        return reconstruction_nats(logits, x, self.likelihood, self.gaussian_std)

    def loss_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        recon = self.reconstruction(self(x).logits, x)
        return {"recon": recon, "loss": recon}

    @property
    def loss_differentiates_input(self) -> bool:
        """Whether the loss takes gradients with respect to the input images (torch.func transforms and the
        FLOP counter cannot trace that)."""
        return False

    def epoch_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """Per-epoch metrics from the mean of each loss term (a family may add derived ones)."""
        return means

    def sample_noise(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise the sampler turns into latents (on the CPU: the same seed gives the same noise on any device)."""
        return self.sampler.noise(count, generator)

    def latent_from_noise(self, noise: torch.Tensor) -> torch.Tensor:
        return self.sampler.latent(noise)

    def decode_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """Decoder logits of the samples that `noise` (from sample_noise) stands for."""
        return self.decode(self.latent_from_noise(noise))

    @torch.no_grad()
    def fit_sampler(self, codes: torch.Tensor) -> None:
        """Fit an ex-post sampler to the codes of the training images (engine.finish_training)."""
        self.sampler.fit(codes)

    def own_metrics(self, images: torch.Tensor) -> dict[str, float]:
        """The family's own test metrics (OWN_METRICS) on the test images."""
        return {}

    def log_weights(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """log p(x, z_k) - log q(z_k|x) of K importance samples z_k of each image, (K, N), for a family with a
        likelihood bound (nll_bound is -log of their mean)."""
        raise NotImplementedError(f"family {self.family} has no likelihood bound")

    def nll_bound(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """-log p(x) per image, bounded with K importance samples, for a family with a likelihood bound."""
        raise NotImplementedError(f"family {self.family} has no likelihood bound")
