"""What the adversarial families (`gan`, `vaegan`) share: the discriminator built from the encoder network,
the non-saturating GAN losses, the R1 penalty, the discriminator's update, and their settings.

D(x) = sigmoid(logit). The discriminator minimises -log D(x) - sum_fakes log(1 - D(fake)); the generator
minimises the non-saturating -log D(G(z)) (Goodfellow et al., 2014), both written with softplus on the
logits: -log sigmoid(l) = softplus(-l) and -log(1 - sigmoid(l)) = softplus(l).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConfigError, boolean, number
from pipeline.models.contract import descend


def discriminator_loss(real_logits: torch.Tensor, *fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(x) - sum over the fakes of log(1 - D(fake)), per image."""
    loss = F.softplus(-real_logits)
    for logits in fake_logits:
        loss = loss + F.softplus(logits)
    return loss


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss -log D(G(z)), per image."""
    return F.softplus(-fake_logits)


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """||d logit / dx||^2 at each real image (Mescheder et al., 2018), with a graph for its own gradient."""
    (gradient,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return gradient.pow(2).flatten(1).sum(1)


def layers(network: nn.Module) -> list[nn.Module]:
    """The network's modules in the order they run (the networks are nested nn.Sequential)."""
    return [module for module in network.modules() if not isinstance(module, nn.Sequential)]


def feature_extractor(discriminator: nn.Module) -> nn.Sequential:
    """Every layer of the discriminator but its last linear one: the features it classifies (shared weights)."""
    return nn.Sequential(*layers(discriminator)[:-1])


def copy_body(source_encoder: nn.Module, discriminator: nn.Module) -> None:
    """Start the discriminator from an encoder of the same arch: every layer but the output one, whose
    size differs (2 x latent_dim numbers against one logit)."""
    for source, target in zip(layers(source_encoder)[:-1], layers(discriminator)[:-1], strict=True):
        target.load_state_dict(source.state_dict())


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """No gradient reaches the module's parameters inside the block (the other player's step)."""
    module.requires_grad_(False)
    try:
        yield
    finally:
        module.requires_grad_(True)


@dataclass(frozen=True)
class AdversarialSettings:
    """Settings of the adversarial game, shared by `gan` and `vaegan`."""

    disc_lr: float | None = None  # the discriminator's Adam learning rate (None: the cell's lr)
    adam_beta1: float = 0.5  # Adam's beta1 for every player (0.5 as in DCGAN)
    r1_weight: float = 1.0  # gamma of the R1 penalty gamma/2 * ||grad D||^2 on real images (0: off); see README
    init_discriminator: bool = False  # with init_from: start the discriminator from the VAE's encoder too


def parse_adversarial(raw: dict, where: str) -> dict:
    """The shared settings of an adversarial cell, validated."""
    beta1 = number(raw.get("adam_beta1", AdversarialSettings.adam_beta1), f"{where}.adam_beta1", low=0.0)
    if beta1 >= 1.0:
        raise ConfigError(f"{where}.adam_beta1 must be in [0, 1), got {beta1:g}")
    disc_lr = raw.get("disc_lr")
    return {
        "disc_lr": None if disc_lr is None else number(disc_lr, f"{where}.disc_lr", low=0.0, low_inclusive=False),
        "adam_beta1": beta1,
        "r1_weight": number(raw.get("r1_weight", AdversarialSettings.r1_weight), f"{where}.r1_weight", low=0.0),
        "init_discriminator": boolean(raw.get("init_discriminator", False), f"{where}.init_discriminator"),
    }


def adversarial_label(settings: AdversarialSettings) -> list[str]:
    parts = [f"R1 γ={settings.r1_weight:g}"] if settings.r1_weight else []
    return parts + (["D from encoder"] if settings.init_discriminator else [])


def make_adversarial_optimizer(
    players: list[nn.Module], discriminator: nn.Module, lr: float, settings: AdversarialSettings
) -> torch.optim.Optimizer:
    """One Adam over every player, the discriminator in its own parameter group. Adam keeps its state per
    parameter and skips parameters without a gradient, so stepping it after each player's backward pass is
    the same as one Adam per player."""
    groups = [{"params": list(player.parameters())} for player in players]
    groups.append({"params": list(discriminator.parameters()), "lr": settings.disc_lr or lr})
    return torch.optim.Adam(groups, lr=lr, betas=(settings.adam_beta1, 0.999))


def discriminator_step(
    discriminator: nn.Module,
    optimizer: torch.optim.Optimizer,
    real: torch.Tensor,
    fakes: list[torch.Tensor],
    r1_weight: float,
) -> dict[str, torch.Tensor]:
    """One step of the discriminator on real images against detached fakes; its per-image terms."""
    if r1_weight:
        real = real.detach().requires_grad_(True)
    real_logits = discriminator(real).squeeze(1)
    fake_logits = [discriminator(fake.detach()).squeeze(1) for fake in fakes]
    loss = discriminator_loss(real_logits, *fake_logits)
    terms = {"d_loss": loss, "d_real": torch.sigmoid(real_logits), "d_fake": torch.sigmoid(fake_logits[0])}
    if r1_weight:
        terms["r1"] = r1_penalty(real_logits, real)
        loss = loss + 0.5 * r1_weight * terms["r1"]
    descend(optimizer, loss.mean())
    return {key: value.detach() for key, value in terms.items()}


def game_terms(discriminator: nn.Module, real: torch.Tensor, fakes: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Both players' losses and D's outputs on a batch, without any update (validation)."""
    real_logits = discriminator(real).squeeze(1)
    fake_logits = [discriminator(fake).squeeze(1) for fake in fakes]
    return {
        "d_loss": discriminator_loss(real_logits, *fake_logits),
        "g_loss": sum(generator_loss(logits) for logits in fake_logits),
        "d_real": torch.sigmoid(real_logits),
        "d_fake": torch.sigmoid(fake_logits[0]),
    }
