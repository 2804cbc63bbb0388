"""Stage `evaluate`: test-set reconstruction, KL, ELBO, per-dimension KL and active units of one cell."""

from __future__ import annotations

import logging

import torch
from torchvision.utils import save_image

from pipeline import tracking
from pipeline.config import StudyConfig
from pipeline.data import images_to_tensor, load_prepared
from pipeline.losses import kl_per_dim, reconstruction_nats
from pipeline.metrics import active_units
from pipeline.models import reparameterize
from pipeline.outputs import PREPARED_FILE, evaluate_dir, read_json, staged_dir, train_dir, write_json
from pipeline.classifier import load_classifier, load_test_features
from pipeline.sample_quality import model_scores
from pipeline.train import RUN_FILE, load_trained, resolve_device, set_threads

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"


@torch.no_grad()
def test_metrics(
    model, images: torch.Tensor, likelihood: str, gaussian_std: float, batch_size: int
) -> tuple[dict, list[float]]:
    """Nats per image over the test set, one z sample per image, plus KL per dimension and active units."""
    recon_sum = torch.zeros((), device=images.device)
    kl_dims_sum = torch.zeros(model.latent_dim, device=images.device)
    posterior_means = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        mu, logvar = model.encode(x)
        logits = model.decode(reparameterize(mu, logvar))
        recon_sum += reconstruction_nats(logits, x, likelihood, gaussian_std).sum()
        kl_dims_sum += kl_per_dim(mu, logvar).sum(0)
        posterior_means.append(mu)
    kl_dims = (kl_dims_sum / len(images)).tolist()
    recon, kl = recon_sum.item() / len(images), sum(kl_dims)
    return {
        "recon": recon,
        "kl": kl,
        "elbo": recon + kl,
        "active_units": active_units(torch.cat(posterior_means)),
    }, kl_dims


@torch.no_grad()
def save_figures(model, images: torch.Tensor, n_images: int, seed: int, folder) -> None:
    """reconstructions.png: originals (top rows) above mean reconstructions; samples.png: decoded z ~ N(0, I)."""
    originals = images[:n_images]
    mu, _ = model.encode(originals)
    reconstructions = torch.sigmoid(model.decode(mu))
    columns = min(n_images, 16)
    save_image(torch.cat([originals, reconstructions]), folder / "reconstructions.png", nrow=columns, pad_value=1.0)
    z = torch.randn(n_images, model.latent_dim, generator=torch.Generator().manual_seed(seed)).to(images.device)
    save_image(torch.sigmoid(model.decode(z)), folder / "samples.png", nrow=columns, pad_value=1.0)


def evaluate_cell(config: StudyConfig, cell_name: str) -> dict:
    cell = config.cell(cell_name)
    settings = config.evaluate
    device = resolve_device(cell.device)
    set_threads()
    model = load_trained(config.study, cell, device)
    test_images = images_to_tensor(load_prepared(PREPARED_FILE)["test_images"], device)
    torch.manual_seed(settings.seed)
    metrics, kl_dims = test_metrics(model, test_images, cell.likelihood, cell.gaussian_std, settings.batch_size)
    scores, class_shares = model_scores(
        model, load_classifier(device), load_test_features(device), test_images, cell.likelihood, cell.gaussian_std,
        config.sample_quality,
    )
    metrics |= scores
    run_id = read_json(train_dir(config.study, cell.name) / RUN_FILE)["run_id"]
    with tracking.cell_run(config, cell, stage=f"evaluate@{cell.name}", run_id=run_id):
        with staged_dir(evaluate_dir(config.study, cell.name)) as out:
            write_json(out / METRICS_FILE, metrics)
            write_json(out / "kl_per_dim.json", kl_dims)
            write_json(out / "class_shares.json", class_shares)
            images_dir = out / "images"
            images_dir.mkdir()
            save_figures(model, test_images, settings.n_images, settings.seed, images_dir)
        tracking.log_test_metrics(metrics)
        tracking.log_test_metrics({f"sample_class_share_{d}": share for d, share in enumerate(class_shares["samples"])})
        tracking.log_artifacts(evaluate_dir(config.study, cell.name) / "images", artifact_path="images")
    log.info(
        "%s test: elbo %.2f = recon %.2f + kl %.2f nats/image, %d/%d active units",
        cell.name, metrics["elbo"], metrics["recon"], metrics["kl"], metrics["active_units"], cell.latent_dim,
    )
    return metrics

