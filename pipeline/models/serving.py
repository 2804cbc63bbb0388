"""A trained model's two halves as standalone networks for MLflow: the decoder (codes z to images) and, where
the family has one, the encoder (images to codes). Exported with torch.export, they load with
`mlflow.pytorch.load_model` and torch alone; this package's code is not needed to use them."""

from __future__ import annotations

import copy

import torch

from pipeline.models.contract import IMAGE_SIZE, Autoencoder

EXAMPLE_BATCH = 4


class Decoder(torch.nn.Module):
    """z (batch, latent_dim) to pixel probabilities (batch, 1, 28, 28). For a VAE or a GAN, z ~ N(0, I) gives
    samples; for the plain autoencoders z is a code (the run's figures show where their codes lie)."""

    def __init__(self, model: Autoencoder):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model.decode(z))


class Encoder(torch.nn.Module):
    """Images (batch, 1, 28, 28) with pixels in [0, 1] to codes (batch, latent_dim): the posterior mean for a VAE."""

    def __init__(self, model: Autoencoder):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x)


def serving_networks(model: Autoencoder) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """Each half on the CPU in eval mode, with an input example: name -> (network, example input)."""
    model = copy.deepcopy(model).cpu().eval()
    generator = torch.Generator().manual_seed(0)
    networks = {"decoder": (Decoder(model), torch.randn(EXAMPLE_BATCH, model.latent_dim, generator=generator))}
    if model.capabilities.encoder:
        images = torch.rand(EXAMPLE_BATCH, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        networks["encoder"] = (Encoder(model), images)
    return networks
