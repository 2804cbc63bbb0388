import dataclasses

import pytest
import torch

from pipeline.config import load_study
from pipeline.losses import kl_divergence, reconstruction_nats
from pipeline.models import build_model, conv_vae, linear_vae, reparameterize

from conftest import REPO


@pytest.mark.parametrize("latent_dim", [1, 2, 10, 20])
@pytest.mark.parametrize("build", [lambda d: linear_vae(d, (64,)), lambda d: conv_vae(d, (8, 16))])
def test_shapes(build, latent_dim):
    model = build(latent_dim)
    x = torch.rand(5, 1, 28, 28)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, latent_dim)
    assert model.decode(mu).shape == (5, 1, 28, 28)
    logits, mu, logvar = model(x)
    assert logits.shape == (5, 1, 28, 28)


@pytest.mark.parametrize("channels", [(4,), (4, 8), (4, 8, 16)])
def test_conv_depths_decode_to_28x28(channels):
    assert conv_vae(3, channels).decode(torch.zeros(2, 3)).shape == (2, 1, 28, 28)


def test_reparameterization_passes_gradients_to_mu_and_logvar():
    mu = torch.zeros(3, 4, requires_grad=True)
    logvar = torch.zeros(3, 4, requires_grad=True)
    z = reparameterize(mu, logvar)
    z.pow(2).sum().backward()
    assert mu.grad is not None and logvar.grad is not None
    assert mu.grad.abs().sum() > 0 and logvar.grad.abs().sum() > 0


def test_reparameterized_samples_have_the_posterior_moments():
    torch.manual_seed(0)
    mu, logvar = torch.full((200_000, 1), 1.5), torch.full((200_000, 1), 2 * torch.log(torch.tensor(0.5)))
    z = reparameterize(mu, logvar)
    assert z.mean().item() == pytest.approx(1.5, abs=0.01)
    assert z.std().item() == pytest.approx(0.5, abs=0.01)


def test_loss_gradients_reach_every_parameter():
    for model in (linear_vae(2, (32,)), conv_vae(2, (4, 8))):
        x = torch.rand(4, 1, 28, 28)
        logits, mu, logvar = model(x)
        (reconstruction_nats(logits, x, "bernoulli") + kl_divergence(mu, logvar)).mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_default_study_has_the_classic_mlp_reference_cell():
    cell = load_study(REPO / "params.yaml").cell("linear-z20-b1-s0")
    assert (cell.arch, cell.latent_dim, cell.hidden, cell.beta) == ("linear", 20, (400,), 1.0)
    assert (cell.lr, cell.batch_size, cell.epochs, cell.likelihood) == (1e-3, 128, 10, "bernoulli")
    model = build_model(cell)
    # 784-400-(20+20) encoder and 20-400-784 decoder, as in the reference script's fc1, fc21, fc22, fc3, fc4.
    expected = (784 * 400 + 400) + 2 * (400 * 20 + 20) + (20 * 400 + 400) + (400 * 784 + 784)
    assert sum(p.numel() for p in model.parameters()) == expected
    relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    assert len(relus) == 2


def test_build_model_follows_the_cell():
    cell = load_study(REPO / "params.yaml").cell("conv-z2-b1-s0")
    assert build_model(cell).latent_dim == 2
    assert build_model(dataclasses.replace(cell, arch="linear", latent_dim=3)).latent_dim == 3
