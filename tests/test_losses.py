import math

import numpy as np
import pytest
import torch
from scipy import stats

from pipeline.models.losses import kl_divergence, kl_per_dim, objective, reconstruction_nats


def test_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mu = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, -2.0, 1.0]], dtype=torch.float64)
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn(400_000, 3, dtype=torch.float64)
    log_q = torch.distributions.Normal(mu, std).log_prob(z).sum(1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    monte_carlo = (log_q - log_p).mean().item()
    assert kl_divergence(mu, logvar).item() == pytest.approx(monte_carlo, abs=0.02)


def test_kl_is_zero_for_the_prior_and_positive_elsewhere():
    assert kl_divergence(torch.zeros(4, 5), torch.zeros(4, 5)).tolist() == [0.0] * 4
    assert (kl_divergence(torch.randn(4, 5), torch.randn(4, 5)) > 0).all()


def test_kl_per_dim_sums_to_kl_and_matches_torch_distributions():
    mu, logvar = torch.randn(6, 4), torch.randn(6, 4)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, torch.exp(0.5 * logvar)), torch.distributions.Normal(0.0, 1.0)
    )
    torch.testing.assert_close(kl_per_dim(mu, logvar), expected)
    torch.testing.assert_close(kl_per_dim(mu, logvar).sum(1), kl_divergence(mu, logvar))


def test_bernoulli_reconstruction_is_summed_cross_entropy_per_image():
    logits = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    p = torch.sigmoid(logits)
    expected = -(x * torch.log(p) + (1 - x) * torch.log(1 - p)).flatten(1).sum(1)
    result = reconstruction_nats(logits, x, "bernoulli")
    assert result.shape == (3,)
    torch.testing.assert_close(result, expected)


def test_gaussian_reconstruction_is_the_negative_log_density_in_nats():
    logits = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    mean = torch.sigmoid(logits).numpy().reshape(2, -1)
    expected = -stats.norm.logpdf(x.numpy().reshape(2, -1), loc=mean, scale=0.2).sum(1)
    result = reconstruction_nats(logits, x, "gaussian", gaussian_std=0.2)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-10)


def test_bernoulli_reconstruction_of_a_uniform_decoder_is_784_log_2():
    x = torch.randint(0, 2, (5, 1, 28, 28)).float()
    result = reconstruction_nats(torch.zeros_like(x), x, "bernoulli")
    torch.testing.assert_close(result, torch.full((5,), 784 * math.log(2)))


def test_objective_weights_kl_by_beta():
    recon, kl = torch.tensor([100.0, 80.0]), torch.tensor([10.0, 20.0])
    assert objective(recon, kl, 0.0).tolist() == [100.0, 80.0]
    assert objective(recon, kl, 1.0).tolist() == [110.0, 100.0]
    assert objective(recon, kl, 4.0).tolist() == [140.0, 160.0]


def test_unknown_likelihood_is_rejected():
    with pytest.raises(ValueError, match="unknown likelihood"):
        reconstruction_nats(torch.zeros(1, 784), torch.zeros(1, 784), "poisson")
