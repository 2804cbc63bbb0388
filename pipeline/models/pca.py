"""`pca`: principal component analysis as a baseline autoencoder ("an autoencoder is like PCA, but
non-linear"), fitted in closed form in one pass over the training images, no gradient steps.

The code of an image x is h = U^T (x - m): its coordinates on the top latent_dim principal directions U
of the training images (mean m); the reconstruction is m + U h. Pixel values off [0, 1] are clipped to
[EPSILON, 1 - EPSILON] before the Bernoulli nats (and the squared error) are computed, so that a
reconstruction of exactly 0 or 1 where the image is not gives a finite loss.

Samples come from probabilistic PCA (Tipping & Bishop, 1999), the maximum-likelihood fit of x = m + W z + e
with z ~ N(0, I), e ~ N(0, sigma^2 I): sigma^2 is the mean of the discarded eigenvalues and
W = U (L - sigma^2 I)^(1/2), L the kept eigenvalues. A sample is the mean of p(x|z), m + W z, as for every
family's samples (decoder means).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.models.contract import Autoencoder, Capabilities
from pipeline.models.networks import PIXELS

if TYPE_CHECKING:
    from pipeline.config import CellConfig

EPSILON = 1e-4  # pixel values are clipped to [EPSILON, 1 - EPSILON] before the Bernoulli likelihood


class Projection(nn.Module):
    """x (N, 1, 28, 28) to h = U^T (x - m) (N, latent_dim)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(PIXELS))
        self.register_buffer("components", torch.zeros(PIXELS, latent_dim))  # U, orthonormal columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) - self.mean) @ self.components


class Reconstruction(nn.Module):
    """h (N, latent_dim) to the logits of the clipped pixel values of m + U h (N, 784)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(PIXELS))
        self.register_buffer("components", torch.zeros(PIXELS, latent_dim))

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return torch.logit((self.mean + code @ self.components.T).clamp(EPSILON, 1 - EPSILON))


class ProbabilisticPCA(nn.Module):
    """z ~ N(0, I) to the code of m + W z: (L - sigma^2 I)^(1/2) z, since U^T W = (L - sigma^2 I)^(1/2)."""

    label = "probabilistic PCA"
    ex_post = False  # fitted with the components, by PCA.fit

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("scale", torch.zeros(latent_dim))  # (L - sigma^2)^(1/2)
        self.register_buffer("noise_variance", torch.zeros(()))  # sigma^2

    def noise(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(count, self.latent_dim, generator=generator)

    def latent(self, noise: torch.Tensor) -> torch.Tensor:
        return noise * self.scale


class PCA(Autoencoder):
    family = "pca"
    capabilities = Capabilities(posterior=False, likelihood_bound=False, one_pass=True, baseline=True)
    Sampler = ProbabilisticPCA

    @classmethod
    def check_cell(cls, cell: CellConfig, train_images: int) -> None:
        if cell.arch != "linear":
            raise ConfigError(f"cells.{cell.name}.arch = {cell.arch}: {cls.family} is a linear map; set arch: linear")
        if cell.epochs != 1:
            raise ConfigError(
                f"cells.{cell.name}.epochs = {cell.epochs}: {cls.family} is fitted in closed form in one pass; "
                "set epochs: 1"
            )
        most = min(PIXELS - 1, train_images - 1)  # sigma^2 needs one discarded direction; n images span n - 1
        if cell.latent_dim > most:
            raise ConfigError(
                f"cells.{cell.name}.latent_dim = {cell.latent_dim}: {cls.family} keeps at most {most} components "
                f"({PIXELS} pixels, {train_images} training images); lower latent_dim"
            )

    def networks(self, cell: CellConfig) -> tuple[nn.Module, nn.Module]:
        return Projection(cell.latent_dim), Reconstruction(cell.latent_dim)

    @torch.no_grad()
    def fit(self, images: torch.Tensor, batch_size: int = 5000) -> None:
        """Mean, covariance and its eigendecomposition in float64, the images read once in batches."""
        total = torch.zeros(PIXELS, dtype=torch.float64, device=images.device)
        second = torch.zeros(PIXELS, PIXELS, dtype=torch.float64, device=images.device)
        for batch in images.split(batch_size):
            flat = batch.flatten(1).double()
            total += flat.sum(0)
            second += flat.T @ flat
        count = len(images)
        mean = total / count
        covariance = (second - count * torch.outer(mean, mean)) / (count - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
        # A sign per direction (its largest entry positive), so the same images give the same components.
        largest = eigenvectors.abs().argmax(0)
        eigenvectors = eigenvectors * eigenvectors[largest, torch.arange(PIXELS)].sign()
        kept = self.latent_dim
        components = eigenvectors[:, :kept]
        noise_variance = eigenvalues[kept:].mean()
        for network in (self.encoder, self.decoder):
            network.mean.copy_(mean)
            network.components.copy_(components)
        self.sampler.scale.copy_((eigenvalues[:kept] - noise_variance).clamp_min(0).sqrt())
        self.sampler.noise_variance.copy_(noise_variance)
