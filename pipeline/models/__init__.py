"""The model families behind one contract (contract.py) and the two networks they share (networks.py).

A new family is one module with an `Autoencoder` subclass and one entry in FAMILIES.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pipeline.models.ae import AE
from pipeline.models.cae import CAE
from pipeline.models.contract import Autoencoder
from pipeline.models.dae import DAE
from pipeline.models.gan import GAN
from pipeline.models.iwae import IWAE
from pipeline.models.pca import PCA
from pipeline.models.vae import VAE
from pipeline.models.vaegan import VAEGAN
from pipeline.models.vqvae import VQVAE

if TYPE_CHECKING:
    from pipeline.config import CellConfig

FAMILIES: dict[str, type[Autoencoder]] = {
    family.family: family for family in (VAE, AE, DAE, CAE, GAN, VAEGAN, IWAE, VQVAE, PCA)
}
# The family the lab's questions (conv against linear, latent_dim, the β sweep) are about, and the baseline the
# adversarial families are read against.
LAB_FAMILY = VAE.family


def family_names(where: Callable[[type[Autoencoder]], bool] = lambda family: True) -> str:
    """The registered families that `where` holds for, for messages: "vae, ae or dae"."""
    names = [name for name, family in FAMILIES.items() if where(family)]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


def build_model(cell: CellConfig) -> Autoencoder:
    return FAMILIES[cell.family](cell)
