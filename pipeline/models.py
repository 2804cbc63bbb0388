"""The two VAE architectures behind one interface.

`encode(x)` gives the Gaussian posterior (mu, log sigma^2), `decode(z)` gives per-pixel logits
shaped like the images (N, 1, 28, 28), and `forward(x)` draws z with the reparameterization trick.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import CellConfig

IMAGE_SIZE = 28
PIXELS = IMAGE_SIZE * IMAGE_SIZE


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I): a sample whose gradient reaches mu and log sigma^2."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


class VAE(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent_dim: int):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.latent_dim = latent_dim

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).view(-1, 1, IMAGE_SIZE, IMAGE_SIZE)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        return self.decode(reparameterize(mu, logvar)), mu, logvar


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them, none after the last."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def linear_vae(latent_dim: int, hidden: tuple[int, ...]) -> VAE:
    """MLP encoder 784-hidden-2*latent and mirrored decoder (the classic 784-400-20 VAE with hidden=(400,))."""
    encoder = nn.Sequential(nn.Flatten(), mlp([PIXELS, *hidden, 2 * latent_dim]))
    decoder = mlp([latent_dim, *reversed(hidden), PIXELS])
    return VAE(encoder, decoder, latent_dim)


def conv_vae(latent_dim: int, channels: tuple[int, ...]) -> VAE:
    """Strided 4x4 convolutions down (each halves the side), transposed convolutions back up."""
    sides = [IMAGE_SIZE]
    for _ in channels:
        sides.append((sides[-1] + 2 * 1 - 4) // 2 + 1)
    if sides[-1] < 1:
        raise ValueError(f"{len(channels)} strided convolutions shrink a 28x28 image to nothing; use fewer channels")
    down: list[nn.Module] = []
    for fan_in, fan_out in zip((1, *channels), channels):
        down += [nn.Conv2d(fan_in, fan_out, kernel_size=4, stride=2, padding=1), nn.ReLU()]
    flat = channels[-1] * sides[-1] ** 2
    encoder = nn.Sequential(*down, nn.Flatten(), nn.Linear(flat, 2 * latent_dim))

    up: list[nn.Module] = [nn.Linear(latent_dim, flat), nn.ReLU(), nn.Unflatten(1, (channels[-1], sides[-1], sides[-1]))]
    outs = (*reversed(channels[:-1]), 1)
    for i, (fan_in, fan_out) in enumerate(zip(reversed(channels), outs)):
        side_in, side_out = sides[-1 - i], sides[-2 - i]
        up.append(
            nn.ConvTranspose2d(
                fan_in, fan_out, kernel_size=4, stride=2, padding=1, output_padding=side_out - 2 * side_in
            )
        )
        if fan_out != 1:
            up.append(nn.ReLU())
    return VAE(encoder, nn.Sequential(*up), latent_dim)


def build_model(cell: CellConfig) -> VAE:
    if cell.arch == "linear":
        return linear_vae(cell.latent_dim, cell.hidden)
    if cell.arch == "conv":
        return conv_vae(cell.latent_dim, cell.channels)
    raise ValueError(f"unknown arch {cell.arch!r}")
