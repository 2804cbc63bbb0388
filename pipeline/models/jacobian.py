"""The squared Frobenius norm of an encoder's Jacobian, ||dh/dx||_F^2, per image: the contractive
autoencoder's penalty (Rifai et al., 2011) and, as its square root, the contraction metric of every family.

Three ways, one per need: exact by autograd (one vector-Jacobian product per code dimension, any
encoder), exact in closed form for a one-hidden-layer ReLU MLP (cheap enough to train with), and an
unbiased random-projection estimate (one backward pass, for encoders where exact is too slow).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def frobenius_sq_exact(encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """||J||_F^2 per image from the full Jacobian, row by row: sum over k of ||d h_k / dx||^2.

    Images of a batch are independent, so the gradient of sum_n h_nk holds each image's row k.
    Differentiable (create_graph) when called with gradients enabled, so it can serve as a training loss.
    """
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        h = encode(x)
        total = torch.zeros(len(x), device=x.device)
        for k in range(h.shape[1]):
            (row,) = torch.autograd.grad(h[:, k].sum(), x, create_graph=create_graph, retain_graph=True)
            total = total + row.flatten(1).pow(2).sum(1)
    return total


def frobenius_sq_projection(encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, projections: int = 1) -> torch.Tensor:
    """Unbiased estimate of ||J||_F^2 per image: E ||J^T v||^2 = tr(J J^T) for v ~ N(0, I) in code space."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        h = encode(x)
        total = torch.zeros(len(x), device=x.device)
        for _ in range(projections):
            v = torch.randn_like(h)
            (product,) = torch.autograd.grad((h * v).sum(), x, create_graph=create_graph, retain_graph=True)
            total = total + product.flatten(1).pow(2).sum(1)
    return total / projections


def frobenius_sq_relu_mlp(x_flat: torch.Tensor, first: nn.Linear, second: nn.Linear) -> torch.Tensor:
    """Exact ||J||_F^2 per image of h = W2 relu(W1 x + b1) + b2.

    J = W2 diag(m) W1 with m = 1[W1 x + b1 > 0], so ||J||_F^2 = m^T ((W2^T W2) o (W1 W1^T)) m: one
    hidden-by-hidden matrix per step instead of latent_dim backward passes.
    """
    mask = (first(x_flat) > 0).to(x_flat.dtype)
    gram = (second.weight.T @ second.weight) * (first.weight @ first.weight.T)
    return ((mask @ gram) * mask).sum(1)
