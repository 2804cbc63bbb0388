import math

import numpy as np
import pytest
import torch
from scipy import linalg

from pipeline.evaluation.metrics import (
    class_distribution,
    frechet_distance,
    inception_score,
    kernel_distance,
    kth_neighbour_radii,
    precision_recall,
)
from pipeline.config import parse_cell
from pipeline.models import build_model
from pipeline.evaluation.sample_quality import importance_weighted_nll
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
    cell = parse_cell("vae", {"family": "vae", "arch": "linear", "latent_dim": 4, "seed": 0, "epochs": 1, "batch_size": 8,
                              "lr": 1e-3, "likelihood": "bernoulli", "gaussian_std": 0.1, "hidden": [32],
                              "channels": [4], "device": "cpu"}, {})
    model = build_model(cell)
    x = torch.rand(200, 1, 28, 28)
    with torch.no_grad():
        mu, logvar = model.posterior(x)
        elbo_nll = []
        for _ in range(50):  # the ELBO's expectation over z
            logits = model.decode(mu + torch.exp(0.5 * logvar) * torch.randn_like(mu))
            elbo_nll.append((reconstruction_nats(logits, x, "bernoulli") + kl_divergence(mu, logvar)).mean())
        elbo_nll = torch.stack(elbo_nll).mean().item()
    nll = {k: importance_weighted_nll(model, x, k, "bernoulli").mean().item() for k in (1, 10, 100, 1000)}
    assert nll[1] == pytest.approx(elbo_nll, abs=0.5)  # K = 1 is the ELBO
    assert nll[1000] <= nll[100] <= nll[10] <= nll[1]
    assert nll[1000] < elbo_nll - 1.0
