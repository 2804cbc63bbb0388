"""The PCA baseline (pipeline/models/pca.py): its fit against scikit-learn's PCA, the probabilistic-PCA samples'
covariance against the fitted one, the clipped Bernoulli nats, the engine's one-pass fit and the cells it
refuses."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA as ScikitPCA

from pipeline.config import ConfigError, parse_study
from pipeline.engine import Training, epochs, restore_checkpoint, save_checkpoint, start_training
from pipeline.models import build_model
from pipeline.models.pca import EPSILON
from test_models import one_cell_study, small_cell


def digit_like_images(count: int = 400, seed: int = 0) -> torch.Tensor:
    """Images in [0, 1] with a few strong directions of variance, like digits."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.rand(6, 784, generator=generator)
    weights = torch.rand(count, 6, generator=generator)
    return (weights @ basis / 3 + 0.05 * torch.rand(count, 784, generator=generator)).clamp(0, 1).view(-1, 1, 28, 28)


def test_reconstruction_equals_scikit_learns_pca_clipped():
    images = digit_like_images()
    model = build_model(small_cell("pca", "linear", latent_dim=5))
    model.fit(images)
    flat = images.flatten(1).double().numpy()
    reference = ScikitPCA(n_components=5, svd_solver="full").fit(flat)
    expected = np.clip(reference.inverse_transform(reference.transform(flat)), EPSILON, 1 - EPSILON)
    with torch.no_grad():
        reconstructed = torch.sigmoid(model.decode(model.encode(images))).flatten(1).double().numpy()
    np.testing.assert_allclose(reconstructed, expected, atol=2e-5)
    # The codes are scikit-learn's scores up to each component's sign; the variances are its explained variances.
    codes = model.encode(images).double().numpy()
    np.testing.assert_allclose(np.abs(codes), np.abs(reference.transform(flat)), atol=2e-4)
    np.testing.assert_allclose(codes.var(0, ddof=1), reference.explained_variance_, rtol=1e-4)
    components = model.encoder.components
    assert (components.gather(0, components.abs().argmax(0, keepdim=True)) > 0).all()  # the sign rule


def test_bernoulli_nats_read_the_clipped_reconstruction():
    images = digit_like_images()
    model = build_model(small_cell("pca", "linear", latent_dim=2))
    model.fit(images)
    x = images[:10]
    with torch.no_grad():
        values = (model.encoder.mean + model.encode(x) @ model.encoder.components.T).clamp(EPSILON, 1 - EPSILON)
        expected = F.binary_cross_entropy(values.double(), x.flatten(1).double(), reduction="none").sum(1)
        recon = model.loss_terms(x)["recon"]
    torch.testing.assert_close(recon.double(), expected, rtol=1e-4, atol=1e-3)


def test_probabilistic_pca_samples_have_the_fitted_covariance():
    images = digit_like_images()
    model = build_model(small_cell("pca", "linear", latent_dim=4))
    model.fit(images)
    flat = images.flatten(1).double()
    eigenvalues = torch.linalg.eigvalsh(torch.cov(flat.T)).flip(0)
    noise_variance = eigenvalues[4:].mean()  # Tipping & Bishop: sigma^2 is the mean discarded eigenvalue
    torch.testing.assert_close(model.sampler.noise_variance.double(), noise_variance, rtol=1e-4, atol=1e-8)
    components = model.encoder.components.double()
    kept = eigenvalues[:4] - noise_variance
    torch.testing.assert_close(model.sampler.scale.double().pow(2), kept, rtol=1e-4, atol=1e-8)
    noise = model.sample_noise(100_000, torch.Generator().manual_seed(0))
    codes = model.latent_from_noise(noise).double()  # the codes U^T W z of m + W z, W = U (L - sigma^2 I)^(1/2)
    torch.testing.assert_close(torch.cov(codes.T), torch.diag(kept), rtol=0, atol=0.02 * float(kept.max()))
    samples = codes @ components.T  # m + W z, less the mean: its covariance is W W^T
    w = components * kept.sqrt()
    torch.testing.assert_close(torch.cov(samples.T), w @ w.T, rtol=0, atol=0.02 * float((w @ w.T).abs().max()))


def test_the_engine_fits_in_one_pass_with_no_optimizer_and_resumes(tmp_path):
    images = digit_like_images()
    cell = small_cell("pca", "linear", latent_dim=3)
    training = start_training(cell, torch.device("cpu"))
    assert training.optimizer is None
    rows = list(epochs(training, images[:300], images[300:]))
    assert [row["epoch"] for row in rows] == [1]
    assert rows[0]["train_loss"] == pytest.approx(rows[0]["train_recon"]) and rows[0]["val_recon"] > 0
    save_checkpoint(tmp_path / "checkpoint.pt", training, "run")
    resumed = Training(cell, build_model(cell), None, torch.Generator())
    assert restore_checkpoint(tmp_path / "checkpoint.pt", resumed) == "run"
    assert torch.equal(resumed.model.encoder.components, training.model.encoder.components)
    assert list(epochs(resumed, images[:300], images[300:])) == []  # its one epoch is done


def pca_study(cell: dict, train_size: int = 100) -> dict:
    return one_cell_study(
        "p", {"family": "pca", "arch": "linear", "latent_dim": 4, "epochs": 1, "seed": 0} | cell, train_size
    )


@pytest.mark.parametrize(
    ("cell", "train_size", "message"),
    [
        ({"latent_dim": 784}, 1000, r"cells\.p\.latent_dim = 784: pca keeps at most 783 components"),
        ({"latent_dim": 100}, 100, r"cells\.p\.latent_dim = 100: pca keeps at most 99 components"),
        ({"arch": "conv"}, 100, r"cells\.p\.arch = conv: pca is a linear map; set arch: linear"),
        ({"epochs": 10}, 100, r"cells\.p\.epochs = 10: pca is fitted in closed form in one pass; set epochs: 1"),
    ],
)
def test_impossible_cells_are_refused_naming_the_cell_key_and_fix(cell, train_size, message):
    with pytest.raises(ConfigError, match=message):
        parse_study(pca_study(cell, train_size), source="t.yaml")
