"""Images to the MNIST classifier's features and class probabilities: the space every sample-quality score
is computed in."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def embed(classifier, images: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's features (N, 128) and class probabilities (N, 10) of images in [0, 1]."""
    classifier.eval()
    features, probabilities = [], []
    for batch in images.split(batch_size):
        f = classifier.features(batch)
        features.append(f)
        probabilities.append(F.softmax(classifier.head(f), dim=1))
    return torch.cat(features), torch.cat(probabilities)
