import math

import numpy as np
import pytest
import torch
from scipy import linalg

from pipeline.config import parse_cell
from pipeline.evaluation.frechet import frechet_distance
from pipeline.evaluation.metrics import (
    class_distribution,
    inception_score,
    kernel_distance,
    kth_neighbour_radii,
    precision_recall,
)
from pipeline.evaluation.sample_quality import importance_weighted_nll
from pipeline.models import build_model
from pipeline.models.gaussian import GaussianAutoencoder
from pipeline.models.losses import kl_divergence, reconstruction_nats


def closed_form_frechet(m1, s1, m2, s2):
    root = linalg.sqrtm(s1 @ s2).real
    return float(np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * root))


def test_frechet_distance_matches_the_gaussian_closed_form():
    rng = np.random.default_rng(0)
    d = 4
    m1, m2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 2.0])
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + np.eye(d), b @ b.T + 0.5 * np.eye(d)
    x = rng.multivariate_normal(m1, s1, size=200_000)
    y = rng.multivariate_normal(m2, s2, size=200_000)
    expected = closed_form_frechet(m1, s1, m2, s2)
    assert frechet_distance(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, rel=0.02)


def test_frechet_distance_equals_scipy_sqrtm_on_random_features():
    rng = np.random.default_rng(1)
    x, y = rng.gamma(2.0, size=(3000, 16)), rng.gamma(2.5, size=(2000, 16))
    expected = closed_form_frechet(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert frechet_distance(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_is_zero_on_itself_and_grows_with_a_shift():
    x = torch.randn(5000, 8, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    shifted = [frechet_distance(x, x + shift) for shift in (0.1, 0.5, 1.0)]
    assert shifted == pytest.approx([8 * 0.01, 8 * 0.25, 8 * 1.0], rel=1e-6)


def test_kid_of_two_samples_of_one_distribution_is_about_zero():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4000, 8, generator=g), torch.randn(4000, 8, generator=g)
    same_mean, same_std = kernel_distance(x, y, subsets=50, subset_size=1000, seed=0)
    shifted_mean, _ = kernel_distance(x, y + 1.0, subsets=50, subset_size=1000, seed=0)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted_mean > 20 * (abs(same_mean) + same_std)


def test_precision_and_recall():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(2000, 8, generator=g)
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    far_precision, far_recall = precision_recall(real, real + 100.0, k=3)
    assert far_precision == 0.0 and far_recall == 0.0
    # Fakes that cover only the tail x_0 > 1 (16% of the real distribution): precise, but low recall.
    tail = real[real[:, 0] > 1.0]
    precision, recall = precision_recall(real, tail, k=3)
    assert precision > 0.95 and recall < 0.5
    # The real set's radii computed once (as model_scores does for samples and reconstructions) give the same.
    assert precision_recall(real, tail, k=3, real_radii=kth_neighbour_radii(real, 3)) == (precision, recall)
    assert kth_neighbour_radii(real, 3).shape == (2000,)


def test_inception_score_and_class_distribution_limits():
    confident_uniform = torch.eye(10).repeat(50, 1)
    assert inception_score(confident_uniform) == pytest.approx(10.0, rel=1e-6)
    one_class = torch.eye(10)[[3] * 500]
    assert inception_score(one_class) == pytest.approx(1.0, rel=1e-6)
    shares, entropy = class_distribution(confident_uniform)
    assert shares == [0.1] * 10 and entropy == pytest.approx(math.log(10))
    shares, entropy = class_distribution(one_class)
    assert shares[3] == 1.0 and entropy == 0.0


def test_importance_weighted_bound_is_at_least_the_elbo_and_tightens_with_k():
    torch.manual_seed(0)
    cell = parse_cell(
        "vae",
        {
            "family": "vae",
            "arch": "linear",
            "latent_dim": 4,
            "seed": 0,
            "epochs": 1,
            "batch_size": 8,
            "lr": 1e-3,
            "likelihood": "bernoulli",
            "gaussian_std": 0.1,
            "hidden": [32],
            "channels": [4],
            "device": "cpu",
        },
        {},
    )
    model = build_model(cell)
    x = torch.rand(200, 1, 28, 28)
    with torch.no_grad():
        mu, logvar = model.posterior(x)
        elbo_nll = []
        for _ in range(50):  # the ELBO's expectation over z
            logits = model.decode(mu + torch.exp(0.5 * logvar) * torch.randn_like(mu))
            elbo_nll.append((reconstruction_nats(logits, x, "bernoulli") + kl_divergence(mu, logvar)).mean())
        elbo_nll = torch.stack(elbo_nll).mean().item()
    nll = {k: importance_weighted_nll(model, x, k).mean().item() for k in (1, 10, 100, 1000)}
    assert nll[1] == pytest.approx(elbo_nll, abs=0.5)  # K = 1 is the ELBO
    assert nll[1000] <= nll[100] <= nll[10] <= nll[1]
    assert nll[1000] < elbo_nll - 1.0


class LinearGaussian:
    """p(z) = N(0, I), p(x|z) = N(Wz + b, sigma^2 I): log p(x) = log N(x; b, W W^T + sigma^2 I) in closed form.

    W = Q diag(s) with orthonormal columns Q, so the exact posterior p(z|x) = N(m(x), S) has a diagonal
    S = diag(1 / (1 + s^2 / sigma^2)) and m(x) = S W^T (x - b) / sigma^2, which a diagonal q(z|x) can equal.
    Images are (B, 1, 2, 3): six pixels. importance_weighted_nll reads the decoder's mean as sigmoid(logits)
    (the Gaussian branch of reconstruction_nats), so decode returns logit(Wz + b); b = 0.5 and a small W keep
    Wz + b inside (0, 1) for every z drawn here, and decode refuses any that is not."""

    shape = (1, 2, 3)
    likelihood = "gaussian"
    # The Gaussian families' bound itself (pipeline/models/gaussian.py), on this model's posterior and decoder.
    importance_samples = GaussianAutoencoder.importance_samples
    log_weights = GaussianAutoencoder.log_weights
    nll_bound = GaussianAutoencoder.nll_bound

    def __init__(self, sigma=0.05, scales=(0.06, 0.04), shift=0.0, widen=1.0):
        pixels, latent = 6, len(scales)
        generator = torch.Generator().manual_seed(3)
        q, _ = torch.linalg.qr(torch.randn(pixels, latent, generator=generator, dtype=torch.float64))
        self.W = q * torch.tensor(scales, dtype=torch.float64)
        self.b = torch.full((pixels,), 0.5, dtype=torch.float64)
        self.sigma = self.gaussian_std = sigma
        self.posterior_var = 1.0 / (1.0 + torch.tensor(scales, dtype=torch.float64) ** 2 / sigma**2)
        # q(z|x) = N(m(x) + shift, widen^2 S): the exact posterior when shift = 0 and widen = 1.
        self.shift, self.widen = shift, widen

    def sample(self, count, seed):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(count, self.W.shape[1], generator=g, dtype=torch.float64)
        x = z @ self.W.T + self.b + self.sigma * torch.randn(count, len(self.b), generator=g, dtype=torch.float64)
        return x.view(count, *self.shape)

    def exact_nll(self, x):
        covariance = self.W @ self.W.T + self.sigma**2 * torch.eye(len(self.b), dtype=torch.float64)
        return -torch.distributions.MultivariateNormal(self.b, covariance).log_prob(x.flatten(1))

    def exact_posterior(self, x):
        return self.posterior_var * ((x.flatten(1) - self.b) @ self.W) / self.sigma**2, self.posterior_var

    def posterior(self, x):
        mean, var = self.exact_posterior(x)
        return mean + self.shift, torch.log(self.widen**2 * var).expand_as(mean)

    def decode(self, z):
        mean = z.double() @ self.W.T + self.b
        assert ((mean > 0) & (mean < 1)).all(), "a decoded mean left (0, 1): the sigmoid cannot represent it"
        return torch.logit(mean).view(len(z), *self.shape)

    def kl_from_the_exact_posterior(self, x):
        """KL(q(z|x) || p(z|x)) between the two diagonal Gaussians, per image."""
        mean, var = self.exact_posterior(x)
        q_mean, q_logvar = self.posterior(x)
        q_var = q_logvar.exp()
        return 0.5 * (q_var / var + (q_mean - mean) ** 2 / var - 1 + torch.log(var / q_var)).sum(1)


# reconstruction_nats' Gaussian branch includes the normalising constant, pixels * (log sigma + log(2 pi) / 2),
# so -log p(x|z) is the exact negative log density and no constant has to be added back to compare with
# -log N(x; b, W W^T + sigma^2 I). (Were the constant dropped, every estimate below would be off by exactly it.)
def iw_nll(model, x, k, seed=0):
    torch.manual_seed(seed)
    return importance_weighted_nll(model, x, k)


def test_the_iw_bound_with_the_exact_posterior_is_exactly_minus_log_p_x_for_any_k():
    model = LinearGaussian()
    x = model.sample(200, seed=1)
    exact = model.exact_nll(x)
    for k in (1, 7, 100):
        # Every importance weight p(x, z) / q(z|x) equals p(x): no Monte-Carlo error at all, for any K.
        torch.testing.assert_close(iw_nll(model, x, k, seed=k), exact, rtol=0, atol=1e-8)
    assert exact.std() > 1.0  # the images differ: the check is not of one constant


def test_the_iw_bound_with_a_mismatched_posterior_is_above_minus_log_p_x_and_closes_in_as_k_grows():
    model = LinearGaussian(shift=0.5, widen=1.8)
    x = model.sample(4000, seed=2)
    exact = model.exact_nll(x)
    kl = model.kl_from_the_exact_posterior(x)
    assert kl.mean() > 1.0  # q is far enough from the posterior for K to matter
    # K = 1000 on fewer images: its estimate varies far less, and it costs 1000 decodes an image.
    gap = {k: iw_nll(model, x[:count], k) - exact[:count] for k, count in ((1, 4000), (10, 4000), (1000, 500))}
    mean = {k: g.mean().item() for k, g in gap.items()}
    error = {k: 4 * g.std().item() / len(g) ** 0.5 for k, g in gap.items()}  # 4 standard errors
    # K = 1 is the negative ELBO, whose expectation is -log p(x) + KL(q(z|x) || p(z|x)), exactly.
    assert mean[1] == pytest.approx(kl.mean().item(), abs=error[1])
    # Each K's bound is above -log p(x) (up to Monte-Carlo error), and tighter for a larger K ...
    assert all(mean[k] >= -error[k] for k in gap)
    assert mean[1] - error[1] > mean[10] + error[10] and mean[10] - error[10] > mean[1000] + error[1000]
    # ... until at K = 1000 it is -log p(x) to a hundredth of a nat.
    assert abs(mean[1000]) < 0.01 and error[1000] < 0.01
