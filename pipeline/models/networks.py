"""The two networks (`arch`), shared by every family: an encoder from images to `outputs` numbers and a
decoder from a latent vector to per-pixel logits. A family decides how many numbers the encoder gives
(2 x latent_dim for a Gaussian posterior, latent_dim for a deterministic code) and what they mean.
"""

from __future__ import annotations

from torch import nn

IMAGE_SIZE = 28
PIXELS = IMAGE_SIZE * IMAGE_SIZE
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}  # a cell's `activation` (config.ACTIVATIONS)


def mlp(sizes: list[int], activation: str = "relu") -> nn.Sequential:
    """Linear layers with the activation between them, none after the last."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        if i:
            layers.append(ACTIVATIONS[activation]())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def conv_sides(channels: tuple[int, ...]) -> list[int]:
    """The image side after each strided 4x4 convolution (each about halves it): 28, 14, 7, 3, 1, 0."""
    sides = [IMAGE_SIZE]
    for _ in channels:
        sides.append((sides[-1] + 2 * 1 - 4) // 2 + 1)
    return sides


def linear_networks(
    outputs: int, latent_dim: int, hidden: tuple[int, ...], activation: str = "relu"
) -> tuple[nn.Module, nn.Module]:
    """MLP encoder 784-hidden-outputs and mirrored decoder latent-hidden-784 (the classic 784-400-20 VAE with
    hidden=(400,); Burda et al.'s 784-200-200-50 with hidden=(200, 200) and tanh)."""
    encoder = nn.Sequential(nn.Flatten(), mlp([PIXELS, *hidden, outputs], activation))
    decoder = mlp([latent_dim, *reversed(hidden), PIXELS], activation)
    return encoder, decoder


def conv_networks(outputs: int, latent_dim: int, channels: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
    """Strided 4x4 convolutions down (each halves the side), transposed convolutions back up."""
    sides = conv_sides(channels)
    if sides[-1] < 1:
        raise ValueError(f"{len(channels)} strided convolutions shrink a 28x28 image to nothing; use fewer channels")
    down: list[nn.Module] = []
    for fan_in, fan_out in zip((1, *channels), channels):
        down += [nn.Conv2d(fan_in, fan_out, kernel_size=4, stride=2, padding=1), nn.ReLU()]
    flat = channels[-1] * sides[-1] ** 2
    encoder = nn.Sequential(*down, nn.Flatten(), nn.Linear(flat, outputs))

    up: list[nn.Module] = [
        nn.Linear(latent_dim, flat),
        nn.ReLU(),
        nn.Unflatten(1, (channels[-1], sides[-1], sides[-1])),
    ]
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
    return encoder, nn.Sequential(*up)


def build_networks(
    arch: str,
    outputs: int,
    latent_dim: int,
    hidden: tuple[int, ...],
    channels: tuple[int, ...],
    activation: str = "relu",
):
    """(encoder, decoder) of an arch, the encoder built first: a seed gives the same decoder to the families whose
    encoders have as many outputs (vae and vaegan; ae, dae and cae), not across them. `activation` is the MLP's."""
    if arch == "linear":
        return linear_networks(outputs, latent_dim, hidden, activation)
    if arch == "conv":
        return conv_networks(outputs, latent_dim, channels)
    raise ValueError(f"unknown arch {arch!r}")
