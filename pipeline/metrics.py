"""Evaluation metrics: pure functions of tensors."""

from __future__ import annotations

import torch

ACTIVE_UNIT_THRESHOLD = 0.01


def active_units(posterior_means: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Latent dimensions d with Cov_x(E[z_d | x]) > threshold (Burda et al., 2016), from (N, latent_dim) means."""
    return int((posterior_means.var(dim=0, unbiased=False) > threshold).sum())
