"""Evaluation metrics: pure functions of tensors."""

from __future__ import annotations

import warnings

import torch

from pipeline.evaluation.frechet import Precomputed

ACTIVE_UNIT_THRESHOLD = 0.01


def active_units(posterior_means: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Latent dimensions d with Cov_x(E[z_d | x]) > threshold (Burda et al., 2016), from (N, latent_dim) means."""
    return int((posterior_means.var(dim=0, unbiased=False) > threshold).sum())


def kernel_distance(
    real: torch.Tensor, fake: torch.Tensor, subsets: int, subset_size: int, seed: int
) -> tuple[float, float]:
    """KID: the unbiased MMD^2 with the cubic polynomial kernel, mean and std over random subsets."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # its note that it buffers all features: these are small
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(
            feature=Precomputed(real.shape[1]), subsets=subsets, subset_size=size, normalize=True
        )
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return mean.item(), std.item()


def inception_score(probabilities: torch.Tensor) -> float:
    """IS-style score exp E_x[KL(p(y|x) || p(y))] from a classifier's class probabilities (1 to #classes)."""
    p = probabilities.double().clamp_min(1e-12)
    marginal = p.mean(0, keepdim=True)
    return torch.exp((p * (p.log() - marginal.log())).sum(1).mean()).item()


def class_distribution(probabilities: torch.Tensor) -> tuple[list[float], float]:
    """Share of images assigned to each class and the entropy of those shares in nats (log 10 = uniform)."""
    counts = torch.bincount(probabilities.argmax(1), minlength=probabilities.shape[1]).double()
    shares = counts / counts.sum()
    entropy = -(shares[shares > 0] * shares[shares > 0].log()).sum().item()
    return shares.tolist(), entropy


def kth_neighbour_radii(points: torch.Tensor, k: int, chunk: int = 1000) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set (the radii of its k-NN
    manifold; those of the real set are the same for every image set scored against it)."""
    points = points.float()
    radii = [
        torch.cdist(points[i : i + chunk], points).kthvalue(k + 1, dim=1).values for i in range(0, len(points), chunk)
    ]
    return torch.cat(radii)


def _covered(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """Whether each query lies within the k-NN ball of at least one point."""
    return torch.cat(
        [(torch.cdist(queries[i : i + chunk], points) <= radii).any(1) for i in range(0, len(queries), chunk)]
    )


def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1000, real_radii: torch.Tensor | None = None
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with k-nearest-neighbour manifolds:
    precision = share of fakes inside the real manifold, recall = share of reals inside the fake manifold.
    `real_radii`: kth_neighbour_radii(real, k, chunk) when already computed."""
    real, fake = real.float(), fake.float()
    if real_radii is None:
        real_radii = kth_neighbour_radii(real, k, chunk)
    precision = _covered(fake, real, real_radii, chunk).double().mean().item()
    recall = _covered(real, fake, kth_neighbour_radii(fake, k, chunk), chunk).double().mean().item()
    return precision, recall
