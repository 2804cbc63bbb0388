"""Stage `train`: fit one grid cell's VAE, checkpointing every epoch so a killed run resumes where it stopped.

The images live on the training device as one tensor; an epoch is a random permutation of indices,
and the loss sums stay on the device until the epoch ends (one host synchronisation per epoch).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline import tracking
from pipeline.config import CellConfig, StudyConfig, cell_as_dict
from pipeline.data import images_to_tensor, load_prepared
from pipeline.losses import kl_divergence, objective, reconstruction_nats
from pipeline.models import VAE, build_model
from pipeline.outputs import PREPARED_FILE, resume_file, staged_dir, train_dir, write_json

log = logging.getLogger(__name__)
MODEL_FILE = "model.pt"
HISTORY_FILE = "history.json"
RUN_FILE = "mlflow_run.json"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device is 'cuda' but no CUDA device is available; set device: auto or cpu")
    return torch.device(requested)


def set_threads() -> None:
    torch.set_num_threads(len(os.sched_getaffinity(0)))


def batch_terms(model: VAE, x: torch.Tensor, cell: CellConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image reconstruction and KL (nats) for one batch, with z drawn by the reparameterization trick."""
    logits, mu, logvar = model(x)
    return reconstruction_nats(logits, x, cell.likelihood, cell.gaussian_std), kl_divergence(mu, logvar)


def train_epoch(model, optimizer, images, cell: CellConfig, generator: torch.Generator, progress) -> dict:
    model.train()
    order = torch.randperm(len(images), generator=generator).to(images.device)
    sums = torch.zeros(3, device=images.device)
    for start in range(0, len(images), cell.batch_size):
        x = images[order[start : start + cell.batch_size]]
        recon, kl = batch_terms(model, x, cell)
        loss = objective(recon, kl, cell.beta)
        optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        optimizer.step()
        sums += torch.stack([recon.sum(), kl.sum(), loss.sum()]).detach()
        progress(len(x))
    recon_sum, kl_sum, loss_sum = (sums / len(images)).tolist()
    return {"recon": recon_sum, "kl": kl_sum, "elbo": recon_sum + kl_sum, "loss": loss_sum}


@torch.no_grad()
def evaluate_split(model: VAE, images: torch.Tensor, cell: CellConfig, batch_size: int = 1000) -> dict:
    """Mean reconstruction, KL, ELBO and objective per image over a whole split (one z sample per image)."""
    model.eval()
    sums = torch.zeros(2, device=images.device)
    for start in range(0, len(images), batch_size):
        recon, kl = batch_terms(model, images[start : start + batch_size], cell)
        sums += torch.stack([recon.sum(), kl.sum()])
    recon_mean, kl_mean = (sums / len(images)).tolist()
    return {
        "recon": recon_mean,
        "kl": kl_mean,
        "elbo": recon_mean + kl_mean,
        "loss": recon_mean + cell.beta * kl_mean,
    }


def save_resume_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".partial")
    torch.save(state, scratch)
    os.replace(scratch, path)


def load_resume_state(path: Path, cell: CellConfig) -> dict | None:
    """The last epoch checkpoint of this exact cell configuration, or None to start fresh."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # a checkpoint cut short by a kill: start over rather than fail
        log.warning("ignoring unreadable resume checkpoint %s", path)
        return None
    if state.get("cell") != cell_as_dict(cell):
        log.info("the cell's parameters changed since %s was written; starting fresh", path)
        return None
    return state


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def progress_reporter(cell: CellConfig, epoch: int, total: int):
    """A tqdm bar per epoch on a terminal; elsewhere nothing per batch (a log line per epoch is written)."""
    if not sys.stderr.isatty():
        return lambda n: None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=f"{cell.name} epoch {epoch}/{cell.epochs}", unit="img", leave=False)
    return bar.update, bar.close


def train_cell(
    config: StudyConfig,
    cell_name: str,
    on_epoch_end: Callable[[int], None] | None = None,
) -> list[dict]:
    """Train one cell, write its stage outputs, and return its per-epoch history."""
    cell = config.cell(cell_name)
    device = resolve_device(cell.device)
    set_threads()
    arrays = load_prepared(PREPARED_FILE)
    train_images = images_to_tensor(arrays["train_images"], device)
    val_images = images_to_tensor(arrays["val_images"], device)

    torch.manual_seed(cell.seed)
    model = build_model(cell).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cell.lr)
    shuffle = torch.Generator().manual_seed(cell.seed)
    history: list[dict] = []
    run_id = None
    checkpoint = resume_file(config.study, cell.name)
    state = load_resume_state(checkpoint, cell)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        shuffle.set_state(state["shuffle"])
        restore_rng_state(state["rng"])
        history, run_id = state["history"], state["run_id"]
        log.info("%s: resuming after epoch %d from %s", cell.name, len(history), checkpoint)

    with tracking.cell_run(config, cell, stage=f"train@{cell.name}", run_id=run_id) as run:
        if state is None:
            tracking.log_cell_params(config, cell)
        for epoch in range(len(history) + 1, cell.epochs + 1):
            advance, close = progress_reporter(cell, epoch, len(train_images))
            train_metrics = train_epoch(model, optimizer, train_images, cell, shuffle, advance)
            close()
            val_metrics = evaluate_split(model, val_images, cell)
            if not all(math.isfinite(v) for v in (*train_metrics.values(), *val_metrics.values())):
                raise TrainingDiverged(
                    f"cell {cell.name}: the loss became NaN or infinite at epoch {epoch} "
                    f"(train loss {train_metrics['loss']}); lower lr (now {cell.lr:g}) or check the data"
                )
            row = {"epoch": epoch, **_prefixed("train", train_metrics), **_prefixed("val", val_metrics)}
            history.append(row)
            tracking.log_epoch(row)
            log.info(
                "%s epoch %d/%d  train loss %.2f  val elbo %.2f (recon %.2f + kl %.2f) nats/image",
                cell.name, epoch, cell.epochs, row["train_loss"], row["val_elbo"], row["val_recon"], row["val_kl"],
            )
            save_resume_state(
                checkpoint,
                {
                    "cell": cell_as_dict(cell),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "shuffle": shuffle.get_state(),
                    "rng": rng_state(),
                    "history": history,
                    "run_id": run.info.run_id,
                },
            )
            if on_epoch_end is not None:
                on_epoch_end(epoch)

        with staged_dir(train_dir(config.study, cell.name)) as out:
            torch.save({"cell": cell_as_dict(cell), "state_dict": model.state_dict()}, out / MODEL_FILE)
            write_json(out / HISTORY_FILE, history)
            write_json(out / "config.json", {"study": config.study, "cell": cell_as_dict(cell)})
            write_json(out / RUN_FILE, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id})
        tracking.log_model(model)
    checkpoint.unlink(missing_ok=True)
    return history


def load_trained(study: str, cell: CellConfig, device: torch.device) -> VAE:
    path = train_dir(study, cell.name) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; train the cell first (dvc repro train@{cell.name})")
    saved = torch.load(path, map_location=device, weights_only=True)
    if saved["cell"] != cell_as_dict(cell):
        raise RuntimeError(f"{path} was trained with other parameters than cells.{cell.name}; re-run dvc repro")
    model = build_model(cell).to(device)
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}_{key}": value for key, value in metrics.items()}
