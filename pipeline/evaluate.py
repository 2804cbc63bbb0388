"""Stage `evaluate`: one cell's test metrics, whatever its family.

For every family: the sample-quality scores. For every family with an encoder (all but the GAN):
reconstruction in nats/image (under the cell's likelihood and under Bernoulli) and as mean squared error,
reconstruction error under the denoising autoencoder's two corruptions, the mean Jacobian norm of the
encoder (contraction), a linear probe and k-NN accuracy on the codes. Where the family has them
(pipeline/models/contract.py capabilities): KL, ELBO, active units, KL per dimension and the
importance-weighted likelihood bound; and the test metrics a family reports of its own (`own_metrics`).
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass

import torch

from pipeline import stage_params, tracking
from pipeline.classifier import load_classifier, load_test_features
from pipeline.config import CellConfig, EvaluateConfig, StudyConfig
from pipeline.data import images_to_tensor, load_prepared
from pipeline.engine import encode_all, resolve_device, set_threads
from pipeline.errors import VaebenchError
from pipeline.evaluation.codes import knn_accuracy, linear_probe_accuracy
from pipeline.evaluation.metrics import active_units
from pipeline.evaluation.sample_quality import model_scores
from pipeline.leftovers import clear_leftovers
from pipeline.models import Autoencoder
from pipeline.models.corruption import gaussian_noise, mask_pixels
from pipeline.models.jacobian import frobenius_sq_exact
from pipeline.models.losses import kl_per_dim, reconstruction_nats, squared_error
from pipeline.outputs import check_room_for_dvc_cache, non_finite, read_json, staged_dir, write_json
from pipeline.paths import (
    CLASS_SHARES_FILE,
    KL_PER_DIM_FILE,
    METRICS_FILE,
    PREPARED_FILE,
    PREPARED_SUMMARY,
    RUN_FILE,
    evaluate_dir,
    evaluate_stage,
    train_dir,
    train_stage,
)
from pipeline.timing import Stopwatch
from pipeline.trained import load_trained

log = logging.getLogger(__name__)


@torch.no_grad()
def reconstruction_metrics(
    model: Autoencoder, images: torch.Tensor, batch_size: int
) -> tuple[dict, list[float] | None]:
    """Means per test image from one forward pass each (one z sample for a VAE): reconstruction under the
    cell's likelihood, under Bernoulli and as MSE; with a posterior, also KL, ELBO, active units and KL
    per dimension (returned second, else None)."""
    device = images.device
    recon_sum, bernoulli_sum, squared_sum = (torch.zeros((), device=device) for _ in range(3))
    kl_dims_sum = torch.zeros(model.latent_dim, device=device)
    codes = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        out = model(x)
        recon_sum += model.reconstruction(out.logits, x).sum()
        bernoulli_sum += reconstruction_nats(out.logits, x, "bernoulli").sum()
        squared_sum += squared_error(out.logits, x).sum()
        if model.capabilities.posterior:
            kl_dims_sum += kl_per_dim(out.code, out.logvar).sum(0)
        codes.append(out.code)
    count = len(images)
    metrics = {
        "recon": recon_sum.item() / count,
        "recon_bernoulli": bernoulli_sum.item() / count,
        "recon_mse": squared_sum.item() / count,
    }
    if not model.capabilities.posterior:
        return metrics, None
    kl_dims = (kl_dims_sum / count).tolist()
    kl = sum(kl_dims)
    metrics |= {"kl": kl, "elbo": metrics["recon"] + kl, "active_units": active_units(torch.cat(codes))}
    return metrics, kl_dims


@torch.no_grad()
def robustness_metrics(model: Autoencoder, images: torch.Tensor, settings: EvaluateConfig) -> dict:
    """MSE between the clean test images and the reconstructions of corrupted copies: Gaussian noise of
    std `noise_std` and masking of a `mask_prob` share of pixels (the denoising autoencoder's corruptions)."""
    generator = torch.Generator().manual_seed(settings.seed)
    corrupted = {
        "noisy_recon_mse": gaussian_noise(images, settings.noise_std, generator),
        "masked_recon_mse": mask_pixels(images, settings.mask_prob, generator),
    }
    torch.manual_seed(settings.seed)
    return {
        name: torch.cat(
            [
                squared_error(model(x).logits, clean)
                for x, clean in zip(inputs.split(settings.batch_size), images.split(settings.batch_size))
            ]
        )
        .mean()
        .item()
        for name, inputs in corrupted.items()
    }


def mean_contraction(model: Autoencoder, images: torch.Tensor, batch_size: int = 250) -> float:
    """Mean ||dh/dx||_F of the encoder's code over the images, exact (one backward pass per code dimension)."""
    with torch.no_grad():  # no graph of the gradients themselves
        norms = [frobenius_sq_exact(model.encode, batch).sqrt() for batch in images.split(batch_size)]
    return torch.cat(norms).mean().item()


def code_metrics(
    model: Autoencoder, arrays: dict, train_images: torch.Tensor, test_images: torch.Tensor, k: int
) -> dict:
    """Linear-probe and k-NN test accuracy on the codes (posterior means for a VAE) of the training images."""
    train_codes = encode_all(model, train_images).cpu().numpy()
    test_codes = encode_all(model, test_images).cpu().numpy()
    labels = arrays["train_labels"], arrays["test_labels"]
    return {
        "probe_accuracy": linear_probe_accuracy(train_codes, labels[0], test_codes, labels[1]),
        "knn_accuracy": knn_accuracy(train_codes, labels[0], test_codes, labels[1], k),
    }


def save_image_grid(images: torch.Tensor, path, columns: int, padding: int = 2) -> None:
    """Images (N, 1, H, W) in [0, 1] as one RGB PNG, `columns` to a row, white between them: the layout and
    rounding of torchvision's save_image (pad_value 1), without importing torchvision (a second per process)."""
    from PIL import Image

    count, _, height, width = images.shape
    padding = 0 if count == 1 else padding  # save_image draws one image alone, unframed
    rows = math.ceil(count / columns)
    grid = torch.ones(3, (height + padding) * rows + padding, (width + padding) * min(columns, count) + padding)
    for k, image in enumerate(images.detach().cpu().float()):
        top, left = (k // columns) * (height + padding) + padding, (k % columns) * (width + padding) + padding
        grid[:, top : top + height, left : left + width] = image
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)


@torch.no_grad()
def save_figures(model: Autoencoder, images: torch.Tensor, n_images: int, seed: int, folder) -> None:
    """reconstructions.png (families with an encoder): originals (top rows) above reconstructions from the
    code; samples.png: decoded samples of the model's sampler (its prior, or a distribution fitted to its codes)."""
    columns = min(n_images, 16)
    if model.capabilities.encoder:
        originals = images[:n_images]
        reconstructions = torch.sigmoid(model.decode(model.encode(originals)))
        save_image_grid(torch.cat([originals, reconstructions]), folder / "reconstructions.png", columns)
    noise = model.sample_noise(n_images, torch.Generator().manual_seed(seed)).to(images.device)
    save_image_grid(torch.sigmoid(model.decode_noise(noise)), folder / "samples.png", columns)


@dataclass
class Evaluation:
    """A cell's test metrics and what its output files hold besides them."""

    metrics: dict
    kl_dims: list[float] | None
    class_shares: dict


def measure(
    config: StudyConfig,
    cell: CellConfig,
    model: Autoencoder,
    arrays: dict,
    device: torch.device,
    stopwatch: Stopwatch | None = None,
) -> Evaluation:
    """Every test metric of a trained model on the prepared `arrays` (nothing written); `stopwatch`
    collects the time by part."""
    settings = config.evaluate
    stopwatch = stopwatch or Stopwatch()
    with stopwatch.part("load_data"):
        test_images = images_to_tensor(arrays["test_images"], device)
        classifier, real_features = load_classifier(device), load_test_features(device)
    torch.manual_seed(settings.seed)
    metrics, kl_dims = {}, None
    if model.capabilities.encoder:
        with stopwatch.part("reconstruction"):
            metrics, kl_dims = reconstruction_metrics(model, test_images, settings.batch_size)
    scores, class_shares = model_scores(model, classifier, real_features, test_images, config.sample_quality, stopwatch)
    metrics |= scores
    if model.capabilities.encoder:
        with stopwatch.part("robustness"):
            metrics |= robustness_metrics(model, test_images, settings)
        if model.capabilities.continuous_code:  # a quantised code does not move with its input
            with stopwatch.part("contraction"):
                metrics["contraction"] = mean_contraction(model, test_images[: settings.contraction_images])
        with stopwatch.part("codes"):
            metrics |= code_metrics(
                model, arrays, images_to_tensor(arrays["train_images"], device), test_images, settings.knn_k
            )
    with stopwatch.part("family_metrics"):
        metrics |= model.own_metrics(test_images)
    broken = non_finite(metrics)
    if broken:
        raise VaebenchError(
            f"cell {cell.name}: test metric {broken[0]} is {metrics[broken[0]]} (NaN or infinite), so nothing was "
            f"written; the trained model is broken: retrain it with a lower lr (dvc repro -f {train_stage(cell)})"
        )
    return Evaluation(metrics, kl_dims, class_shares)


def evaluate_cell(config: StudyConfig, cell_name: str) -> dict:
    cell = config.cell(cell_name)
    settings = config.evaluate
    tracking.check_store()
    clear_leftovers(config.study)
    run_id = tracking.recorded_run(train_dir(config.study, cell.name) / RUN_FILE, train_stage(cell))
    device = resolve_device(cell.device)
    set_threads(config.threads)
    stopwatch = Stopwatch()
    with stopwatch.part("load_model"):
        model = load_trained(config.study, cell, device)
    with stopwatch.part("load_data"):
        arrays = load_prepared(PREPARED_FILE)
    result = measure(config, cell, model, arrays, device, stopwatch)
    metrics, class_shares = result.metrics, result.class_shares
    # Before the training run is reopened: metrics measured with edited settings never reach it.
    params = stage_params.evaluate_params(config, cell.name)
    stage_params.check_unchanged(config, params, evaluate_stage(cell))
    with tracking.cell_run(config, cell, stage=evaluate_stage(cell), run_id=run_id):
        with stopwatch.part("write_and_log"):
            with staged_dir(evaluate_dir(config.study, cell.name)) as out:
                write_json(out / METRICS_FILE, metrics)
                write_json(out / KL_PER_DIM_FILE, result.kl_dims)  # null for a family without a posterior
                write_json(out / CLASS_SHARES_FILE, class_shares)
                images_dir = out / "images"
                images_dir.mkdir()
                test_images = images_to_tensor(arrays["test_images"][: settings.n_images], device)
                save_figures(model, test_images, settings.n_images, settings.seed, images_dir)
            tracking.log_settings(
                {f"evaluate.{key}": value for key, value in vars(settings).items()}
                | {f"sample_quality.{key}": value for key, value in vars(config.sample_quality).items()}
                | {"threads": config.threads}
            )
            # The run's input since training (MLflow keeps one input per data set and run); the metrics name it.
            test_set = tracking.prepared_dataset(read_json(PREPARED_SUMMARY), PREPARED_FILE)
            shares = {f"sample_class_share_{d}": share for d, share in enumerate(class_shares["samples"])}
            tracking.log_test_metrics(metrics | shares, test_set)
            tracking.log_artifacts(evaluate_dir(config.study, cell.name) / "images", artifact_path="images")
        tracking.log_stage_seconds("evaluate", stopwatch.seconds)
    try:
        stage_params.check_unchanged(config, params, evaluate_stage(cell))
        check_room_for_dvc_cache([evaluate_dir(config.study, cell.name)])
    except BaseException:
        shutil.rmtree(evaluate_dir(config.study, cell.name), ignore_errors=True)
        raise
    reconstruction = (
        f"recon {metrics['recon']:.2f} nats/image (MSE {metrics['recon_mse']:.4f}), " if "recon" in metrics else ""
    )
    bound = f"elbo {metrics['elbo']:.2f} nats/image, " if "elbo" in metrics else ""
    probe = f"probe accuracy {metrics['probe_accuracy']:.3f}, " if "probe_accuracy" in metrics else ""
    log.info("%s test: %s%s%ssample FID %.1f", cell.name, reconstruction, bound, probe, metrics["fid_mnist_cnn"])
    return metrics
