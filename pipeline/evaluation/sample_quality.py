"""Sample-quality scores of a model (and of real digits: pipeline/floor.py) in the MNIST classifier's feature space,
and the importance-weighted estimate of the test log-likelihood.

Score names end in `_mnist_cnn` because they use the in-project MNIST CNN, not Inception-v3: they are
comparable with each other, not with published Inception FIDs.
"""

from __future__ import annotations

import math

import torch

from pipeline.config import SampleQualityConfig
from pipeline.evaluation.features import embed
from pipeline.evaluation.frechet import frechet_distance
from pipeline.evaluation.metrics import (
    class_distribution,
    inception_score,
    kernel_distance,
    kth_neighbour_radii,
    precision_recall,
)
from pipeline.models import Autoencoder
from pipeline.models.losses import reconstruction_nats
from pipeline.timing import Stopwatch

SUFFIX = "mnist_cnn"


def set_scores(
    classifier,
    real_features: torch.Tensor,
    images: torch.Tensor,
    settings: SampleQualityConfig,
    real_radii: torch.Tensor | None = None,
    stopwatch: Stopwatch | None = None,
) -> tuple[dict, list[float]]:
    """Scores of an image set against the real (test) features, and its share of each predicted digit.
    `real_radii`: the real features' k-NN radii (precision_recall), when already computed."""
    stopwatch = stopwatch or Stopwatch()
    with stopwatch.part("classifier_features"):
        features, probabilities = embed(classifier, images)
    with stopwatch.part("kid"):
        kid_mean, kid_std = kernel_distance(
            real_features.cpu(), features.cpu(), settings.kid_subsets, settings.kid_subset_size, settings.seed
        )
    with stopwatch.part("precision_recall"):
        precision, recall = precision_recall(real_features, features, settings.pr_k, real_radii=real_radii)
    with stopwatch.part("fid"):
        fid = frechet_distance(real_features.cpu(), features.cpu())
    shares, entropy = class_distribution(probabilities)
    scores = {
        f"fid_{SUFFIX}": fid,
        f"kid_{SUFFIX}_mean": kid_mean,
        f"kid_{SUFFIX}_std": kid_std,
        f"is_{SUFFIX}": inception_score(probabilities),
        f"precision_{SUFFIX}": precision,
        f"recall_{SUFFIX}": recall,
        f"class_entropy_{SUFFIX}": entropy,
    }
    return scores, shares


@torch.no_grad()
def model_scores(
    model: Autoencoder,
    classifier,
    real_features: torch.Tensor,
    test_images: torch.Tensor,
    settings: SampleQualityConfig,
    stopwatch: Stopwatch | None = None,
) -> tuple[dict, dict]:
    """Scores of N samples and of the reconstructions of N test images, plus the IW likelihood where the
    family has a likelihood bound. Samples decode z ~ N(0, I), or for a family without a prior the same
    noise mapped through the Gaussian fitted to its training codes (ex-post density estimation)."""
    stopwatch = stopwatch or Stopwatch()
    with stopwatch.part("precision_recall"):
        real_radii = kth_neighbour_radii(real_features, settings.pr_k)
    with stopwatch.part("decode"):
        generator = torch.Generator().manual_seed(settings.seed)
        noise = torch.randn(settings.n_samples, model.latent_dim, generator=generator).to(test_images.device)
        samples = torch.cat(
            [torch.sigmoid(model.decode(model.latent_from_noise(chunk))) for chunk in noise.split(1000)]
        )
    sample_scores, sample_shares = set_scores(classifier, real_features, samples, settings, real_radii, stopwatch)
    scores = sample_scores
    if model.capabilities.encoder:
        with stopwatch.part("decode"):
            originals = test_images[: settings.n_samples]
            reconstructions = torch.cat(
                [torch.sigmoid(model.decode(model.encode(chunk))) for chunk in originals.split(1000)]
            )
        recon_scores, _ = set_scores(classifier, real_features, reconstructions, settings, real_radii, stopwatch)
        scores = {**sample_scores, **{f"{key}_recon": value for key, value in recon_scores.items()}}
    if not model.capabilities.likelihood_bound:
        return scores, {"samples": sample_shares}

    subset = test_images[: settings.iw_images]
    if settings.binarize:
        subset = torch.bernoulli(subset, generator=torch.Generator(subset.device).manual_seed(settings.seed))
    torch.manual_seed(settings.seed)
    with stopwatch.part("iw_nll"):
        nll = importance_weighted_nll(model, subset, settings.iw_samples, model.likelihood, model.gaussian_std)
    return {**scores, "iw_nll": nll.mean().item()}, {"samples": sample_shares}


@torch.no_grad()
def importance_weighted_nll(
    model: Autoencoder,
    x: torch.Tensor,
    k: int,
    likelihood: str,
    gaussian_std: float = 0.1,
    decodes_per_chunk: int = 20_000,
) -> torch.Tensor:
    """-log p(x) estimated with K importance samples from q(z|x) (Burda et al., 2016), nats per image.

    log p(x) >= log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x); K = 1 is the ELBO, and the bound tightens as K grows.
    """
    results = []
    images_per_chunk = max(1, decodes_per_chunk // k)
    for batch in x.split(images_per_chunk):
        mu, logvar = model.posterior(batch)
        std = torch.exp(0.5 * logvar)
        z = mu + std * torch.randn(k, *mu.shape, device=mu.device)  # (K, B, D)
        logits = model.decode(z.flatten(0, 1)).view(k, len(batch), *batch.shape[1:])
        log_px_z = -reconstruction_nats(logits.flatten(0, 1), batch.repeat(k, 1, 1, 1), likelihood, gaussian_std).view(
            k, -1
        )
        log_pz = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_qz = (-0.5 * ((z - mu) / std).pow(2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_w = log_px_z + log_pz - log_qz
        results.append(-(torch.logsumexp(log_w, dim=0) - math.log(k)))
    return torch.cat(results)
