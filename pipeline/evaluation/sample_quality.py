"""Sample-quality scores of a model (and of real digits: pipeline/floor.py) in the MNIST classifier's feature space,
and the importance-weighted estimate of the test log-likelihood.

Score names end in `_mnist_cnn` because they use the in-project MNIST CNN, not Inception-v3: they are
comparable with each other, not with published Inception FIDs.
"""

from __future__ import annotations

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
from pipeline.models.gaussian import iw_nll
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
    family has a likelihood bound. Samples decode the noise the model's sampler draws (its prior, or the
    distribution fitted to its training codes)."""
    stopwatch = stopwatch or Stopwatch()
    with stopwatch.part("precision_recall"):
        real_radii = kth_neighbour_radii(real_features, settings.pr_k)
    with stopwatch.part("decode"):
        noise = model.sample_noise(settings.n_samples, torch.Generator().manual_seed(settings.seed))
        samples = torch.cat(
            [torch.sigmoid(model.decode_noise(chunk)) for chunk in noise.to(test_images.device).split(1000)]
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
        nll = importance_weighted_nll(model, subset, settings.iw_samples)
    scores["iw_nll"] = nll.mean().item()
    if len(nll) > 1:
        scores["iw_nll_se"] = standard_error(nll)
    return scores, {"samples": sample_shares}


def standard_error(values: torch.Tensor) -> float:
    """The standard error of the mean of `values` across its entries (sample standard deviation / sqrt(n))."""
    return (values.double().std() / len(values) ** 0.5).item()


@torch.no_grad()
def importance_weighted_nll(
    model: Autoencoder, x: torch.Tensor, k: int, decodes_per_chunk: int = 20_000
) -> torch.Tensor:
    """The model's K-sample bound on -log p(x) (its `nll_bound`) per image, in chunks of images whose K
    decodes stay within `decodes_per_chunk`. When K alone exceeds it, each image's K log weights are computed
    in pieces of at most `decodes_per_chunk` samples and combined in one log-mean-exp, so memory stays bounded
    whatever K is."""
    if k <= decodes_per_chunk:
        images_per_chunk = decodes_per_chunk // k
        return torch.cat([model.nll_bound(batch, k) for batch in x.split(images_per_chunk)])
    pieces = [decodes_per_chunk] * (k // decodes_per_chunk) + [k % decodes_per_chunk] * bool(k % decodes_per_chunk)
    return torch.cat([iw_nll(torch.cat([model.log_weights(image, count) for count in pieces])) for image in x.split(1)])
