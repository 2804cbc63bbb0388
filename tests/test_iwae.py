"""The IWAE family (pipeline/models/iwae.py): its training loss against the importance-weighted bound computed
independently with torch.distributions, and K = 1 against the VAE's objective."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

from pipeline.config import ConfigError
from pipeline.models import build_model
from test_models import small_cell


def independent_log_weights(model, x, eps):
    """log p(x|z) + log p(z) - log q(z|x) for z = mu + sigma * eps, with torch.distributions and BCE."""
    mu, logvar = model.posterior(x)
    std = torch.exp(0.5 * logvar)
    z = mu + std * eps  # (K, N, D)
    logits = model.decode(z.flatten(0, 1)).view(len(eps), *x.shape)
    log_px_z = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").flatten(2).sum(-1)
    log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = Normal(mu, std).log_prob(z).sum(-1)
    return (log_px_z + log_pz - log_qz).double()


@pytest.mark.parametrize("k", [1, 5])
def test_the_iwae_loss_is_minus_the_log_mean_importance_weight(k):
    torch.manual_seed(0)
    model = build_model(small_cell("iwae", "linear", k=k))
    x = torch.rand(6, 1, 28, 28)
    torch.manual_seed(1)
    loss = model.loss_terms(x)["loss"]
    torch.manual_seed(1)  # the same draws: importance_samples takes eps from the global generator
    eps = torch.randn(k, 6, 3)
    log_w = independent_log_weights(model, x, eps)
    expected = -torch.log(torch.exp(log_w - log_w.max(0).values).mean(0)) - log_w.max(0).values
    torch.testing.assert_close(loss.double(), expected, rtol=0, atol=1e-3)


def test_with_one_sample_the_iwae_objective_is_the_vaes_on_the_same_draw_and_in_expectation():
    """With K = 1 the loss is recon + log q(z|x) - log p(z) on one draw: the draw's reconstruction is the one
    the VAE reads from the same seed, and the rest, averaged over draws, is the VAE's KL in closed form."""
    torch.manual_seed(0)
    iwae = build_model(small_cell("iwae", "linear", k=1))
    torch.manual_seed(0)
    vae = build_model(small_cell("vae", "linear"))
    assert all(torch.equal(a, b) for a, b in zip(iwae.state_dict().values(), vae.state_dict().values()))
    with torch.no_grad():  # a posterior far from the prior: a KL of several nats
        for model in (iwae, vae):
            for parameter in model.encoder.parameters():
                parameter.mul_(8)
    x = torch.rand(4, 1, 28, 28).repeat(2000, 1, 1, 1)  # four images, 2000 draws each
    with torch.no_grad():
        torch.manual_seed(1)
        iwae_terms = iwae.loss_terms(x)
        torch.manual_seed(1)
        vae_terms = vae.loss_terms(x)
    torch.testing.assert_close(iwae_terms["recon"], vae_terms["recon"], rtol=1e-6, atol=1e-4)
    kl_estimate = (iwae_terms["loss"] - iwae_terms["recon"]).view(2000, 4).double()
    kl = vae_terms["kl"].view(2000, 4).double()[0]
    error = kl_estimate.std(0) / 2000**0.5
    assert ((kl_estimate.mean(0) - kl).abs() < 4 * error).all()  # within 4 standard errors of the mean
    assert (kl > 10 * error).all()  # and the KL is large against that error, so the check can fail


def test_more_samples_tighten_the_bound_on_the_same_model():
    torch.manual_seed(0)
    model = build_model(small_cell("iwae", "linear", k=1))
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        bounds = {k: model.nll_bound(x.repeat(200, 1, 1, 1), k).mean().item() for k in (1, 10, 100)}
    assert bounds[100] < bounds[10] < bounds[1]
    assert math.isfinite(bounds[100])


def test_k_below_one_is_one_line():
    with pytest.raises(ConfigError, match=r"cells\.iwae-linear\.k must be >= 1, got 0"):
        small_cell("iwae", "linear", k=0)
