"""The squared Frobenius norm of an encoder's Jacobian, ||dh/dx||_F^2, per image: the contractive
autoencoder's penalty (Rifai et al., 2011) and, as its square root, the contraction metric of every family.

Three ways, one per need: exact by autograd (one vector-Jacobian product per code dimension, any
encoder), exact in closed form for a one-hidden-layer ReLU MLP (cheap enough to train with), and an
unbiased random-projection estimate (one backward pass, for encoders where exact is too slow).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def _squared_vjp_norms(
    encode: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    directions: Callable[[torch.Tensor], Iterable[torch.Tensor]],
) -> torch.Tensor:
    """Per image, the sum over code-space directions v of ||J^T v||^2, one backward pass per direction.

    Images of a batch are independent, so the gradient of sum_n (h_n . v_n) holds each image's J_n^T v_n.
    Differentiable (create_graph) when called with gradients enabled, so it can serve as a training loss.
    """
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        h = encode(x)
        total = torch.zeros(len(x), device=x.device)
        for v in directions(h):
            (product,) = torch.autograd.grad((h * v).sum(), x, create_graph=create_graph, retain_graph=True)
            total = total + product.flatten(1).pow(2).sum(1)
    return total


def frobenius_sq_exact(encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """||J||_F^2 per image from the full Jacobian, row by row: sum over k of ||d h_k / dx||^2."""
    return _squared_vjp_norms(encode, x, lambda h: torch.eye(h.shape[1], dtype=h.dtype, device=h.device).unbind(0))


def frobenius_sq_projection(
    encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, projections: int = 1
) -> torch.Tensor:
    """Unbiased estimate of ||J||_F^2 per image: E ||J^T v||^2 = tr(J J^T) for v ~ N(0, I) in code space."""
    return _squared_vjp_norms(encode, x, lambda h: (torch.randn_like(h) for _ in range(projections))) / projections


def frobenius_sq_relu_mlp(x_flat: torch.Tensor, first: nn.Linear, second: nn.Linear) -> torch.Tensor:
    """Exact ||J||_F^2 per image of h = W2 relu(W1 x + b1) + b2.

    J = W2 diag(m) W1 with m = 1[W1 x + b1 > 0], so ||J||_F^2 = m^T ((W2^T W2) o (W1 W1^T)) m: one
    hidden-by-hidden matrix per step instead of latent_dim backward passes.
    """
    mask = (first(x_flat) > 0).to(x_flat.dtype)
    gram = (second.weight.T @ second.weight) * (first.weight @ first.weight.T)
    return ((mask @ gram) * mask).sum(1)
