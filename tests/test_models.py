"""The model contract, for every family on both networks."""

import dataclasses

import pytest
import torch

from conftest import REPO
from pipeline.config import load_study, parse_cell
from pipeline.models import FAMILIES, build_model
from pipeline.models.contract import Autoencoder, ModelOutput
from pipeline.models.corruption import gaussian_noise, mask_pixels
from pipeline.models.gaussian import reparameterize
from pipeline.models.losses import reconstruction_nats

SETTINGS = {
    "vae": {"beta": 1.0},
    "ae": {},
    "dae": {"noise": "gaussian", "noise_std": 0.5},
    "cae": {"contraction_weight": 0.1},
    "gan": {},
    "vaegan": {},
    "iwae": {"k": 3},
    "vqvae": {"codebook_size": 8, "embedding_dim": 1},
    "pca": {},
}
# The cells of the contract test: every family on every arch it trains on (PCA is linear only), at latent_dim
# 3, but for the conv VQ-VAE, whose code is a 7 x 7 grid (of embedding_dim 1 here).
LATENT_DIMS = {("vqvae", "conv"): 49}
CONTRACT_CELLS = [
    (family, arch) for family in SETTINGS for arch in ("linear", "conv") if (family, arch) != ("pca", "conv")
]


TRAIN_DEFAULTS = {
    "epochs": 1,
    "batch_size": 8,
    "lr": 1e-3,
    "likelihood": "bernoulli",
    "gaussian_std": 0.1,
    "hidden": [32],
    "channels": [4, 8],
    "device": "cpu",
}


def one_cell_study(name: str, cell: dict, train_size: int = 100) -> dict:
    """A study of one cell on these small networks, for parse_study (its data is never read)."""
    return {
        "study": "t",
        "data": {"root": ".", "train_size": train_size, "val_size": 10, "test_size": 10},
        "train": dict(TRAIN_DEFAULTS),
        "cells": {name: cell},
        "evaluate": {},
    }


def small_cell(family: str, arch: str, latent_dim: int = 3, **changes):
    spec = {"family": family, "arch": arch, "latent_dim": latent_dim, "seed": 0, **SETTINGS[family], **changes}
    cell = parse_cell(f"{family}-{arch}", spec, TRAIN_DEFAULTS)
    FAMILIES[family].check_cell(cell, train_images=1000)
    return cell


def test_every_registered_family_is_in_the_contract_test_once():
    assert list(SETTINGS) == list(FAMILIES)


@pytest.mark.parametrize(("family", "arch"), CONTRACT_CELLS)
def test_contract_shapes_finite_loss_and_gradients_reach_every_parameter(family, arch):
    torch.manual_seed(0)
    latent_dim = LATENT_DIMS.get((family, arch), 3)
    model = build_model(small_cell(family, arch, latent_dim))
    assert model.family == family
    x = torch.rand(5, 1, 28, 28)
    if model.capabilities.one_pass:  # fitted in closed form: no parameters, no optimizer
        model.fit(torch.rand(20, 1, 28, 28))
        assert not list(model.parameters()) and model.make_optimizer(1e-3) is None
    assert model.decode(torch.randn(5, latent_dim)).shape == (5, 1, 28, 28)
    noise = model.sample_noise(5, torch.Generator().manual_seed(0))
    assert model.decode_noise(noise).shape == (5, 1, 28, 28)
    if model.capabilities.encoder:
        out = model(x)
        assert isinstance(out, ModelOutput)
        assert out.logits.shape == (5, 1, 28, 28)
        assert out.code.shape == out.z.shape == (5, latent_dim)
        assert model.encode(x).shape == (5, latent_dim)
        assert (out.logvar is not None) == model.capabilities.posterior
    else:  # a GAN: images come from z only
        with pytest.raises(TypeError, match="no encoder"):
            model(x)
    terms = model.loss_terms(x)
    assert all(term.shape == (5,) and torch.isfinite(term).all() for term in terms.values())
    if not model.capabilities.one_pass:
        terms["loss"].mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert set(model.own_metrics(x)) == set(model.OWN_METRICS)


@pytest.mark.parametrize("family", ["ae", "dae", "cae"])
def test_deterministic_families_have_the_code_as_latent_and_no_posterior(family):
    model = build_model(small_cell(family, "linear"))
    x = torch.rand(4, 1, 28, 28)
    out = model(x)
    assert torch.equal(out.code, out.z) and torch.equal(out.code, model.encode(x))
    assert out.logvar is None and not hasattr(model, "posterior")
    assert not model.capabilities.posterior
    assert model.sampler.ex_post and not model.capabilities.likelihood_bound


def test_vae_loss_terms_are_recon_plus_beta_kl_and_report_the_elbo():
    model = build_model(small_cell("vae", "linear", beta=4.0))
    torch.manual_seed(1)
    terms = model.loss_terms(torch.rand(6, 1, 28, 28))
    assert torch.allclose(terms["loss"], terms["recon"] + 4.0 * terms["kl"])
    assert model.epoch_metrics({"recon": 90.0, "kl": 10.0, "loss": 130.0})["elbo"] == 100.0


def test_cae_loss_adds_the_weighted_squared_jacobian_norm():
    model = build_model(small_cell("cae", "linear", contraction_weight=0.5))
    x = torch.rand(4, 1, 28, 28)
    terms = model.loss_terms(x)
    assert torch.allclose(terms["loss"], terms["recon"] + 0.5 * terms["contraction"])
    # ||dh/dx||_F^2 of the code h = encode(x), from the full Jacobian by autograd, one image at a time.
    jacobian_sq = torch.stack(
        [torch.autograd.functional.jacobian(lambda one: model.encode(one[None])[0], image).pow(2).sum() for image in x]
    )
    assert torch.allclose(terms["contraction"], jacobian_sq, rtol=1e-4)
    assert (terms["contraction"] > 0).all()


@pytest.mark.parametrize("settings", [{"noise": "gaussian", "noise_std": 0.5}, {"noise": "mask", "mask_prob": 0.3}])
def test_dae_reconstructs_the_clean_image_from_a_corrupted_one(settings):
    torch.manual_seed(0)
    model = build_model(
        parse_cell(
            "dae-linear", {"family": "dae", "arch": "linear", "latent_dim": 3, "seed": 0, **settings}, TRAIN_DEFAULTS
        )
    )
    x = torch.rand(4, 1, 28, 28) + 0.1  # no pixel is 0 before masking
    seen = []  # what the encoder was given
    model.encoder.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    terms = model.loss_terms(x)
    (corrupted,) = seen
    assert corrupted.shape == x.shape and not torch.equal(corrupted, x)  # the encoder read a corrupted copy ...
    with torch.no_grad():
        logits = model.decode(model.encode(corrupted))
    # ... and the loss compares its reconstruction with the clean image, not with the corrupted input.
    torch.testing.assert_close(terms["recon"], reconstruction_nats(logits, x, "bernoulli"))
    assert not torch.allclose(terms["recon"], reconstruction_nats(logits, corrupted, "bernoulli"))
    assert torch.equal(terms["loss"], terms["recon"])
    no_noise = build_model(small_cell("dae", "linear", noise_std=0.0))
    plain = build_model(small_cell("ae", "linear"))
    plain.load_state_dict(no_noise.state_dict())
    assert torch.allclose(no_noise.loss_terms(x)["loss"], plain.loss_terms(x)["loss"])  # no noise: the plain AE


def test_gaussian_corruption_has_the_set_mean_and_variance():
    x = torch.full((200, 1, 28, 28), 0.3)
    noisy = gaussian_noise(x, 0.5, torch.Generator().manual_seed(0))
    noise = noisy - x
    assert noise.mean().item() == pytest.approx(0.0, abs=0.005)
    assert noise.var().item() == pytest.approx(0.25, rel=0.01)


def test_masking_drops_the_set_share_of_pixels_and_keeps_the_rest():
    x = torch.rand(200, 1, 28, 28) + 0.1  # no pixel is 0 before masking
    masked = mask_pixels(x, 0.3, torch.Generator().manual_seed(0))
    dropped = masked == 0
    assert dropped.float().mean().item() == pytest.approx(0.3, abs=0.005)
    assert torch.equal(masked[~dropped], x[~dropped])
    assert torch.equal(mask_pixels(x, 0.0), x)


def test_ex_post_gaussian_reproduces_the_codes_mean_and_covariance():
    model = build_model(small_cell("ae", "linear", latent_dim=2))
    generator = torch.Generator().manual_seed(0)
    codes = torch.randn(50_000, 2, generator=generator) @ torch.tensor([[2.0, 0.0], [1.0, 0.5]]) + torch.tensor(
        [3.0, -1.0]
    )
    model.fit_sampler(codes)
    drawn = model.latent_from_noise(torch.randn(50_000, 2, generator=generator))
    assert torch.allclose(drawn.mean(0), codes.mean(0), atol=0.05)
    assert torch.allclose(torch.cov(drawn.T), torch.cov(codes.T), rtol=0.03, atol=0.03)
    vae = build_model(small_cell("vae", "linear"))
    noise = torch.randn(3, 3)
    assert torch.equal(vae.latent_from_noise(noise), noise)  # a VAE samples its prior


@pytest.mark.parametrize("channels", [(4,), (4, 8), (4, 8, 16), (4, 8, 16, 32)])
def test_conv_depths_decode_to_28x28(channels):
    model = build_model(small_cell("ae", "conv", channels=list(channels)))
    assert model.decode(torch.zeros(2, 3)).shape == (2, 1, 28, 28)


@pytest.mark.parametrize("arch", ["linear", "conv"])
def test_a_seed_starts_the_same_decoder_in_families_whose_encoders_give_as_many_outputs(arch):
    """Every family on the shared networks (networks.py) has the same decoder network. The encoder is built
    first, so the decoder's starting weights depend on the seed and on the size of the encoder's output layer:
    vae, vaegan and iwae (2 x latent_dim numbers) start from one decoder, ae, dae and cae (latent_dim) from
    another; the gan's (one logit) differs."""

    def decoder(family, seed=0):
        torch.manual_seed(seed)
        return build_model(small_cell(family, arch, latent_dim=3)).decoder.state_dict()

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)

    shared = [family for family in FAMILIES if FAMILIES[family].networks is Autoencoder.networks]
    decoders = {family: decoder(family) for family in shared}
    shapes = {family: [(key, tuple(t.shape)) for key, t in state.items()] for family, state in decoders.items()}
    assert len({tuple(s) for s in shapes.values()}) == 1
    outputs = {family: FAMILIES[family].encoder_outputs(3) for family in shared}
    assert outputs == {"vae": 6, "vaegan": 6, "iwae": 6, "ae": 3, "dae": 3, "cae": 3, "gan": 1}
    for family in shared:
        for other in shared:
            if outputs[family] == outputs[other]:
                assert same(decoders[family], decoders[other]), (family, other)
        assert same(decoder(family), decoders[family])  # the seed alone decides them
        assert not same(decoder(family, seed=1), decoders[family])


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


def test_default_study_has_the_classic_mlp_reference_cell():
    cell = load_study(REPO / "studies" / "default.yaml").cell("linear-z20-b1-s0")
    assert (cell.family, cell.arch, cell.latent_dim, cell.hidden, cell.settings.beta) == (
        "vae",
        "linear",
        20,
        (400,),
        1.0,
    )
    assert (cell.lr, cell.batch_size, cell.epochs, cell.likelihood) == (1e-3, 128, 10, "bernoulli")
    model = build_model(cell)
    # 784-400-(20+20) encoder and 20-400-784 decoder, as in the reference script's fc1, fc21, fc22, fc3, fc4.
    expected = (784 * 400 + 400) + 2 * (400 * 20 + 20) + (20 * 400 + 400) + (400 * 784 + 784)
    assert sum(p.numel() for p in model.parameters()) == expected
    relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    assert len(relus) == 2


def test_default_study_compares_each_family_on_the_network_of_the_lab_cell():
    config = load_study(REPO / "studies" / "default.yaml")
    reference = config.cell("linear-z10-b1-s0")
    others = [cell for cell in config.cells.values() if cell.family != "vae"]
    assert sorted(cell.family for cell in others) == ["ae", "cae", "dae", "gan", "iwae", "pca"]
    for cell in others:
        if cell.family == "pca":  # fitted in one pass, no network: the lab cell's latent size
            assert (cell.arch, cell.latent_dim, cell.epochs) == (reference.arch, reference.latent_dim, 1)
            continue
        # The IWAE beside the reference network of the likelihood literature (784-400-20), the others beside
        # the lab's cell.
        vae = config.cell("linear-z20-b1-s0") if cell.family == "iwae" else reference
        same_network = dataclasses.replace(
            cell, name=vae.name, family="vae", settings=vae.settings, lr=vae.lr, init_from=None
        )
        assert same_network == vae
    # The fine-tuned generator starts from that very cell, at the GAN learning rate.
    tuned = config.cell("gan-linear-z10-ft-s0")
    assert (tuned.init_from, tuned.lr) == ("linear-z10-b1-s0", 0.0002)
