"""The per-epoch sample-quality probe of the adversarial families (read by the train stage)."""

from __future__ import annotations

import torch

from pipeline.evaluation.features import embed
from pipeline.evaluation.frechet import frechet_distance
from pipeline.models import Autoencoder


class FIDProbe:
    """A cheap per-epoch sample-quality probe for the adversarial families: FID, in the classifier's features,
    of `n` samples decoded from the same fixed noise every epoch against `n` validation images."""

    def __init__(self, classifier, val_images: torch.Tensor, model: Autoencoder, n: int = 2000, seed: int = 0):
        self.classifier = classifier
        self.real_features = embed(classifier, val_images[:n])[0].cpu()
        self.noise = model.sample_noise(n, torch.Generator().manual_seed(seed)).to(val_images.device)

    @torch.no_grad()
    def __call__(self, model: Autoencoder) -> dict[str, float]:
        model.eval()
        samples = torch.cat([torch.sigmoid(model.decode_noise(z)) for z in self.noise.split(1000)])
        return {"fid_probe": frechet_distance(self.real_features, embed(self.classifier, samples)[0].cpu())}
