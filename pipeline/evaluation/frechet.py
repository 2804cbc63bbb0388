"""The Frechet distance between two feature sets: the sample-quality probe of adversarial training and the
FID of evaluation both use it."""

from __future__ import annotations

import torch
from torch import nn


class Precomputed(nn.Module):
    """Hands torchmetrics features that are already computed (the classifier runs once per image set)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)) between Gaussians fitted to two feature sets.
    NaN when a feature is not finite (the matrix square root of such a covariance can crash the process)."""
    from torchmetrics.image.fid import FrechetInceptionDistance  # here: it imports torchvision (3 s a process)

    if not (torch.isfinite(real).all() and torch.isfinite(fake).all()):
        return float("nan")
    metric = FrechetInceptionDistance(feature=Precomputed(real.shape[1]), normalize=True).set_dtype(torch.float64)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return metric.compute().item()
