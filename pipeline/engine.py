"""The training engine: the one loop that every model is trained with (the train and tune stages, the
benchmarks and the MNIST classifier), the per-epoch metrics, the NaN check and the resume state.

The images live on the training device as one tensor; an epoch is a random permutation of indices,
and the loss sums stay on the device until the epoch ends (one host synchronisation per epoch).
A family differs only in `loss_terms` (pipeline/models/contract.py); the loop reads `loss` to minimise
and reports the mean of every term.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.config import CellConfig, ConfigError, cell_as_dict
from pipeline.errors import ArtifactError, VaebenchError
from pipeline.models import Autoencoder, build_model
from pipeline.outputs import non_finite, save_torch_file

log = logging.getLogger(__name__)


class TrainingDiverged(VaebenchError):
    """The loss became NaN or infinite."""


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but no CUDA device is available; set device: auto or cpu")
    return torch.device(requested)


def set_threads(threads: int) -> None:
    """Compute with `threads` CPU threads (the study's `threads`), however many cores the machine has."""
    torch.set_num_threads(threads)


def train_epoch(
    step: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    size: int,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """One pass over `size` examples in a random order. `step(indices)` trains on one batch and returns
    its per-example terms. Returns the mean of every term over the epoch."""
    order = torch.randperm(size, generator=generator).to(device)
    sums = None
    for start in range(0, size, batch_size):
        batch = order[start : start + batch_size]
        terms = step(batch)
        batch_sums = torch.stack([term.sum() for term in terms.values()]).detach()
        sums = batch_sums if sums is None else sums + batch_sums
        if progress is not None:
            progress(len(batch))
    return dict(zip(terms, (sums / size).tolist()))


def binarized(images: torch.Tensor, binarizer: torch.Generator | None) -> torch.Tensor:
    """Each grey pixel p drawn as Bernoulli(p) (dynamic binarization), or the images as they are when there is
    no `binarizer`. The uniforms come from the binarizer on the CPU, so a seed draws the same images on any
    device and a checkpoint resumes on another one."""
    if binarizer is None:
        return images
    uniforms = torch.rand(images.shape, generator=binarizer).to(images.device)
    return (uniforms < images).to(images.dtype)


def model_epoch(
    model: Autoencoder,
    optimizer,
    images: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    progress: Callable[[int], None] | None = None,
    binarizer: torch.Generator | None = None,
) -> dict[str, float]:
    """One training epoch of a model of any family over the images; for a family fitted in one pass, its fit
    and the mean of its loss terms over the images. With a `binarizer`, every batch is drawn binary anew."""
    if model.capabilities.one_pass:
        drawn = binarized(images, binarizer)
        model.fit(drawn)
        return evaluate_split(model, drawn)
    model.train()
    means = train_epoch(
        lambda batch: model.train_step(binarized(images[batch], binarizer), optimizer),
        len(images),
        batch_size,
        generator,
        images.device,
        progress,
    )
    return model.epoch_metrics(means)


@torch.no_grad()
def evaluate_split(model: Autoencoder, images: torch.Tensor, batch_size: int = 1000) -> dict[str, float]:
    """The mean of every loss term over a whole split (one z sample or corruption per image)."""
    model.eval()
    sums = None
    for start in range(0, len(images), batch_size):
        terms = model.loss_terms(images[start : start + batch_size])
        batch_sums = torch.stack([term.sum() for term in terms.values()])
        sums = batch_sums if sums is None else sums + batch_sums
    return model.epoch_metrics(dict(zip(terms, (sums / len(images)).tolist())))


@torch.no_grad()
def encode_all(model: Autoencoder, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The codes (posterior means for a VAE) of all images."""
    model.eval()
    return torch.cat([model.encode(batch) for batch in images.split(batch_size)])


@dataclass
class Training:
    """Everything a training run carries from epoch to epoch, and what a resume checkpoint restores."""

    cell: CellConfig
    model: Autoencoder
    optimizer: torch.optim.Optimizer | None  # None for a family fitted in one pass
    shuffle: torch.Generator
    history: list[dict] = field(default_factory=list)
    binarizer: torch.Generator | None = None  # draws the binary training images (data.binarize: dynamic)


def start_training(cell: CellConfig, device: torch.device, binarize: bool = False) -> Training:
    """A fresh model and optimizer for the cell; `binarize`: train on dynamically binarized images, drawn by a
    generator of their own, seeded with the cell's seed."""
    torch.manual_seed(cell.seed)
    model = build_model(cell).to(device)
    optimizer = model.make_optimizer(cell.lr, cell.adam_betas, cell.adam_eps)
    binarizer = torch.Generator().manual_seed(cell.seed) if binarize else None
    return Training(cell, model, optimizer, torch.Generator().manual_seed(cell.seed), binarizer=binarizer)


def scheduled_rate(schedule: tuple[tuple[int, float], ...], epoch: int) -> float:
    """The learning rate of `epoch` (counted from 1) under a schedule of (epochs, rate) stages."""
    end = 0
    for count, rate in schedule:
        end += count
        if epoch <= end:
            return rate
    raise ValueError(f"epoch {epoch} is beyond the schedule's {end} epochs")


def set_scheduled_rate(optimizer: torch.optim.Optimizer, cell: CellConfig, epoch: int) -> float:
    """Set the rate of `epoch` under the cell's lr_schedule; every parameter group keeps its ratio to the cell's
    lr (a discriminator's own rate). Returns the rate."""
    rate = scheduled_rate(cell.lr_schedule, epoch)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * rate / cell.lr
    return rate


def progress_reporter(cell: CellConfig, epoch: int, total: int):
    """A tqdm bar per epoch on a terminal; elsewhere nothing per batch (a log line per epoch is written)."""
    if not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=f"{cell.name} epoch {epoch}/{cell.epochs}", unit="img", leave=False)
    return bar.update, bar.close


def epochs(
    training: Training,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    probe: Callable[[Autoencoder], dict[str, float]] | None = None,
) -> Iterator[dict]:
    """Train the remaining epochs, yielding each epoch's row of train_* and val_* metrics (val_* includes
    what `probe(model)` measures) after it is appended to the history. Stops with TrainingDiverged when a
    metric is NaN or infinite."""
    cell = training.cell
    for epoch in range(len(training.history) + 1, cell.epochs + 1):
        rate = {}
        if cell.lr_schedule is not None and training.optimizer is not None:
            rate = {"lr": set_scheduled_rate(training.optimizer, cell, epoch)}
        advance, close = progress_reporter(cell, epoch, len(train_images))
        train_metrics = model_epoch(
            training.model,
            training.optimizer,
            train_images,
            cell.batch_size,
            training.shuffle,
            advance,
            training.binarizer,
        )
        close()
        val_metrics = evaluate_split(training.model, val_images)
        if probe is not None:
            val_metrics |= probe(training.model)
        row = {"epoch": epoch, **rate, **_prefixed("train", train_metrics), **_prefixed("val", val_metrics)}
        broken = non_finite(row)
        if broken:
            what = "the loss" if "train_loss" in broken else broken[0]
            raise TrainingDiverged(
                f"cell {cell.name}: {what} became NaN or infinite at epoch {epoch} "
                f"(train loss {train_metrics['loss']}); lower lr (now {cell.lr:g}) or check the data"
            )
        training.history.append(row)
        yield row


def finish_training(training: Training, train_images: torch.Tensor) -> None:
    """A family whose sampler is fitted after training (ex-post) gets it fitted to the training images' codes."""
    if training.model.sampler.ex_post:
        training.model.fit_sampler(encode_all(training.model, train_images))


def save_checkpoint(path: Path, training: Training, run_id: str, inputs: dict | None = None) -> None:
    """`inputs` identifies what else the training read: the SHA-256 of the prepared data, and of the model
    a fine-tuned cell started from. A checkpoint resumes only with the same cell and the same inputs."""
    state = {
        "cell": cell_as_dict(training.cell),
        "inputs": inputs or {},
        "model": training.model.state_dict(),
        "optimizer": training.optimizer.state_dict() if training.optimizer is not None else {},
        "shuffle": training.shuffle.get_state(),
        "binarizer": training.binarizer.get_state() if training.binarizer is not None else None,
        "rng": _rng_state(),
        "history": training.history,
        "run_id": run_id,
    }
    save_torch_file(state, path)


CHECKPOINT_FIELDS = {
    "model": dict,
    "optimizer": dict,
    "shuffle": torch.Tensor,
    "rng": dict,
    "history": list,
    "run_id": str,
}


def restore_checkpoint(path: Path, training: Training, inputs: dict | None = None) -> str | None:
    """Continue from the last epoch checkpoint of this exact cell configuration and inputs (see
    save_checkpoint); returns its MLflow run id, or None (and changes nothing) when there is no usable one."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a checkpoint cut short by a kill, or not a checkpoint at all: start over rather than fail
        log.warning("ignoring unreadable resume checkpoint %s", path)
        return None
    if not isinstance(state, dict) or any(
        not isinstance(state.get(key), kind) for key, kind in CHECKPOINT_FIELDS.items()
    ):
        log.warning("ignoring %s: it is not a resume checkpoint", path)
        return None
    if state.get("cell") != cell_as_dict(training.cell):
        log.info("the cell's parameters changed since %s was written; starting fresh", path)
        return None
    inputs, saved = inputs or {}, state.get("inputs")
    if saved != inputs:
        changed = [key for key in inputs if not isinstance(saved, dict) or saved.get(key) != inputs[key]]
        log.info(
            "%s: its input (%s) changed since %s was written; starting fresh",
            training.cell.name,
            ", ".join(changed) or "?",
            path,
        )
        return None
    try:
        training.model.load_state_dict(state["model"])
        if training.optimizer is not None:
            training.optimizer.load_state_dict(state["optimizer"])
        training.shuffle.set_state(state["shuffle"])
        if training.binarizer is not None:
            training.binarizer.set_state(state["binarizer"])
        _restore_rng_state(state["rng"])
    except (RuntimeError, KeyError, TypeError, ValueError) as error:  # the model may be half-loaded: stop
        path.unlink()
        raise ArtifactError(
            f"resume checkpoint {path} does not fit the cell ({error}); removed it, re-run to start the cell over"
        ) from None
    training.history = state["history"]
    log.info("%s: resuming after epoch %d from %s", training.cell.name, len(training.history), path)
    return state["run_id"]


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}_{key}": value for key, value in metrics.items()}
