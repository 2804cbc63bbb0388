"""The CAE penalty and the contraction metric against the full Jacobian from torch.autograd.functional."""

import pytest
import torch
from torch import nn

from pipeline.models.jacobian import frobenius_sq_exact, frobenius_sq_projection, frobenius_sq_relu_mlp
from pipeline.models.networks import linear_networks


def reference(encode, x):
    """||J||_F^2 per image from torch.autograd.functional.jacobian, one image at a time."""
    return torch.stack(
        [torch.autograd.functional.jacobian(lambda image: encode(image[None])[0], image).pow(2).sum() for image in x]
    )


@pytest.fixture
def mlp_encoder():
    torch.manual_seed(0)
    encoder, _ = linear_networks(outputs=3, latent_dim=3, hidden=(16,))
    return encoder.double()


def test_closed_form_for_one_hidden_relu_layer_is_exact(mlp_encoder):
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    layers = mlp_encoder[1]
    closed = frobenius_sq_relu_mlp(x.flatten(1), layers[0], layers[2])
    assert torch.allclose(closed, reference(mlp_encoder, x), rtol=1e-10)


def test_autograd_rows_give_the_exact_norm_for_any_encoder():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 3, 4, 2, 1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 14 * 14, 4)).double()
    x = torch.rand(5, 1, 28, 28, dtype=torch.float64)
    assert torch.allclose(frobenius_sq_exact(conv, x), reference(conv, x), rtol=1e-10)


def test_penalty_is_differentiable_in_training_and_detached_in_evaluation(mlp_encoder):
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    frobenius_sq_exact(mlp_encoder, x).sum().backward()
    # J = W2 diag(m) W1 depends on both weight matrices (the biases only move the piecewise-constant mask).
    weights = [layer.weight for layer in mlp_encoder[1] if isinstance(layer, nn.Linear)]
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in weights)
    with torch.no_grad():
        assert not frobenius_sq_exact(mlp_encoder, x).requires_grad


def test_random_projection_estimate_is_unbiased(mlp_encoder):
    torch.manual_seed(1)
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    exact = reference(mlp_encoder, x)
    estimate = frobenius_sq_projection(mlp_encoder, x, projections=20_000)
    assert torch.allclose(estimate, exact, rtol=0.03)
    single = torch.stack([frobenius_sq_projection(mlp_encoder, x) for _ in range(5)])
    assert not torch.allclose(single[0], single[1])  # one projection is a random estimate, not the exact value
