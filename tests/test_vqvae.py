"""The VQ-VAE family (pipeline/models/vqvae.py): nearest-entry quantisation, the straight-through gradient, the
codebook's moving averages against a hand computation, perplexity against its definition, the fitted
categoricals and the cells it refuses."""

import math

import pytest
import torch

from pipeline.config import ConfigError, parse_study
from pipeline.models import build_model
from pipeline.models.vqvae import nearest_entries, perplexity
from test_models import one_cell_study, small_cell


def test_quantisation_picks_the_nearest_codebook_entry():
    generator = torch.Generator().manual_seed(0)
    codebook, vectors = torch.randn(16, 3, generator=generator), torch.randn(500, 3, generator=generator)
    assert torch.equal(nearest_entries(vectors, codebook), torch.cdist(vectors, codebook).argmin(1))
    model = build_model(small_cell("vqvae", "linear", latent_dim=4, embedding_dim=2, codebook_size=8))
    z_e = torch.randn(5, 4, generator=generator)
    quantised, entries = model.quantise(z_e)
    assert entries.shape == (5, 2)
    expected = torch.cdist(z_e.view(-1, 2), model.codebook).argmin(1)
    assert torch.equal(entries.flatten(), expected)
    assert torch.equal(quantised.view(-1, 2), model.codebook[expected])


@pytest.mark.parametrize(("arch", "latent_dim"), [("linear", 4), ("conv", 98)])
def test_the_straight_through_gradient_reaches_the_encoder(arch, latent_dim):
    torch.manual_seed(0)
    model = build_model(small_cell("vqvae", arch, latent_dim=latent_dim, embedding_dim=2, codebook_size=8))
    x = torch.rand(6, 1, 28, 28)
    out = model(x)
    torch.testing.assert_close(out.z, out.code)  # forward: the decoder reads the entries themselves ...
    model.loss_terms(x)["recon"].mean().backward()  # ... backward: the reconstruction's gradient reaches the encoder
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert "codebook" not in dict(model.named_parameters())  # moved by its averages, not by the optimizer


def test_the_codebook_follows_its_moving_averages():
    model = build_model(small_cell("vqvae", "linear", latent_dim=2, embedding_dim=2, codebook_size=3, decay=0.5))
    model.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
    model.entry_sum.copy_(model.codebook)
    vectors = torch.tensor([[0.2, 0.0], [0.0, 0.4], [1.5, 1.0]])
    model.update_codebook(vectors, torch.tensor([0, 0, 1]))
    # By hand, decay 0.5: N = 0.5 * 1 + 0.5 * (2, 1, 0) = (1.5, 1, 0.5); m_0 = 0.5 * 0 + 0.5 * (0.2, 0.4),
    # m_1 = 0.5 * (1, 1) + 0.5 * (1.5, 1), m_2 = 0.5 * (5, 5); N smoothed with eps = 1e-5 over n = 3.
    size = torch.tensor([1.5, 1.0, 0.5])
    sums = torch.tensor([[0.1, 0.2], [1.25, 1.0], [2.5, 2.5]])
    smoothed = (size + 1e-5) / (3 + 3 * 1e-5) * 3
    torch.testing.assert_close(model.cluster_size, size)
    torch.testing.assert_close(model.entry_sum, sums)
    torch.testing.assert_close(model.codebook, sums / smoothed[:, None])
    # An entry no vector is assigned to stays (nearly) where it was.
    torch.testing.assert_close(model.codebook[2], torch.tensor([5.0, 5.0]), atol=1e-4, rtol=0)


def test_perplexity_and_dead_codes_against_their_definitions():
    assert perplexity(torch.tensor([5.0, 5.0, 0.0, 0.0])) == pytest.approx(2.0)
    assert perplexity(torch.ones(256)) == pytest.approx(256.0)
    counts = torch.tensor([6.0, 3.0, 1.0, 0.0])
    p = counts[:3] / 10
    assert perplexity(counts) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    torch.manual_seed(0)
    model = build_model(small_cell("vqvae", "linear", latent_dim=4, embedding_dim=2, codebook_size=8))
    images = torch.rand(30, 1, 28, 28)
    entries = model.quantise(model.encoder(images))[1].flatten()
    used = torch.bincount(entries, minlength=8).float()
    metrics = model.own_metrics(images)
    assert metrics["dead_codes"] == pytest.approx((used == 0).float().mean().item())
    assert metrics["codebook_perplexity"] == pytest.approx(perplexity(used))


def test_samples_follow_the_categoricals_fitted_to_the_training_entries():
    model = build_model(small_cell("vqvae", "linear", latent_dim=4, embedding_dim=2, codebook_size=4))
    model.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    # Position 0 always entry 1; position 1 entries 2 and 3 in the ratio 1:3.
    entries = torch.tensor([[1, 2], [1, 3], [1, 3], [1, 3]]).repeat(25, 1)
    codes = model.codebook[entries].flatten(1)
    model.fit_sampler(codes)
    expected = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.25, 0.75]])
    torch.testing.assert_close(model.sampler.probabilities, expected)
    noise = model.sample_noise(40_000, torch.Generator().manual_seed(0))
    drawn = model.sampler.entries(noise)
    assert (drawn[:, 0] == 1).all()
    assert (drawn[:, 1] == 3).float().mean().item() == pytest.approx(0.75, abs=0.01)
    assert torch.equal(model.latent_from_noise(noise[:5]), model.codebook[drawn[:5]].flatten(1))


def test_training_starts_the_codebook_from_the_first_batch_and_moves_it_by_averages():
    torch.manual_seed(0)
    model = build_model(small_cell("vqvae", "linear", latent_dim=4, embedding_dim=2, codebook_size=8))
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        first = model.encoder(x).reshape(-1, 2)
    model.initialise_codebook(first)
    # Every entry is one of the batch's 32 encoder outputs, no two the same output.
    matches = (model.codebook[:, None, :] == first[None]).all(-1)
    assert matches.any(1).all() and len({int(row.nonzero()[0]) for row in matches}) == 8
    # A training step on an initialised codebook: the entries the batch's encoder outputs pick, then one
    # average step, N_k = 0.99 * 1 + 0.01 * n_k, m_k = 0.99 * e_k + 0.01 * (sum of the vectors assigned to k).
    start = model.codebook.clone()
    with torch.no_grad():
        vectors = model.encoder(x).reshape(-1, 2)
    assigned = torch.cdist(vectors, start).argmin(1)
    counts = torch.bincount(assigned, minlength=8).float()
    sums = torch.zeros(8, 2).index_add_(0, assigned, vectors)
    model.train_step(x, model.make_optimizer(1e-3))
    size = 0.99 + 0.01 * counts
    torch.testing.assert_close(model.cluster_size, size)
    torch.testing.assert_close(model.entry_sum, 0.99 * start + 0.01 * sums)
    smoothed = (size + 1e-5) / (size.sum() + 8 * 1e-5) * size.sum()
    torch.testing.assert_close(model.codebook, model.entry_sum / smoothed[:, None])
    fresh = build_model(small_cell("vqvae", "linear", latent_dim=4, embedding_dim=2, codebook_size=8))
    fresh.train_step(x, fresh.make_optimizer(1e-3))
    assert bool(fresh.initialised)  # a fresh model's first step starts its codebook from the batch


def vq_study(cell: dict) -> dict:
    return one_cell_study("v", {"family": "vqvae", "arch": "linear", "latent_dim": 4, "seed": 0} | cell)


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ({"codebook_size": 1}, r"cells\.v\.codebook_size must be >= 2"),
        ({"commitment": -0.1}, r"cells\.v\.commitment must be >= 0"),
        ({"decay": 1.0}, r"cells\.v\.decay must be below 1"),
        ({"latent_dim": 5, "embedding_dim": 2}, r"cells\.v\.latent_dim = 5 does not divide into positions of "),
        (
            {"arch": "conv", "latent_dim": 10},
            r"cells\.v\.latent_dim = 10: a conv vqvae codes a 7x7 grid.*: 98",
        ),
    ],
)
def test_impossible_cells_are_refused_naming_the_cell_key_and_fix(cell, message):
    with pytest.raises(ConfigError, match=message):
        parse_study(vq_study(cell), source="t.yaml")
