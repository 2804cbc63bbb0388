"""Images per second of the engine, the standard torchvision/DataLoader loop and the compute bound, with
FLOP counts and peak memory, each measured in a fresh process."""

from __future__ import annotations

import dataclasses
import gzip
import logging
import multiprocessing
import os
import resource
import shutil
import time
from pathlib import Path

import torch

from pipeline.config import StudyConfig
from pipeline.data import (
    MNIST_SHA256,
    images_to_tensor,
    load_prepared,
    raw_dir,
)
from pipeline.engine import model_epoch, set_threads
from pipeline.errors import VaebenchError
from pipeline.models import build_model
from pipeline.paths import PREPARED_FILE

log = logging.getLogger(__name__)

TORCHVISION_DIR = Path(".vaebench") / "torchvision"


def matmul_gflops(size: int = 2048, seconds: float = 3.0) -> float:
    """The machine's float32 matmul rate: the yardstick for achieved GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - started) / 1e9


def training_step_flops(cell, batch_size: int) -> int:
    """FLOPs of one forward and backward pass on a batch (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(cell)
    x = torch.rand(batch_size, 1, 28, 28)
    with FlopCounterMode(display=False) as counter:
        model.loss_terms(x)["loss"].mean().backward()
    return counter.get_total_flops()


def torchvision_root(data_root: str) -> Path:
    """A folder in torchvision's layout with the IDX files extracted (torchvision reads them uncompressed)."""
    target = TORCHVISION_DIR / "MNIST" / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for name in MNIST_SHA256:
        extracted = target / name.removesuffix(".gz")
        if not extracted.exists():
            partial = extracted.with_name(extracted.name + ".partial")
            with gzip.open(raw_dir(data_root) / name) as source, open(partial, "wb") as sink:
                shutil.copyfileobj(source, sink)
            os.replace(partial, extracted)
    return TORCHVISION_DIR


def standard_step(model, optimizer, x: torch.Tensor, cell) -> float:
    """One step of the standard loop: summed loss, backward, step, and a `.item()` that waits for it."""
    loss = model.loss_terms(x)["loss"].sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


REPEATS = 3


def best_of(measure, repeats: int = REPEATS) -> float:
    """The best of several timed repeats: the least disturbed by whatever else the machine does."""
    return max(measure() for _ in range(repeats))


def measure_engine(cell, images: int, threads: int) -> float:
    set_threads(threads)
    data = images_to_tensor(load_prepared(PREPARED_FILE)["train_images"][:images])
    torch.manual_seed(0)
    model = build_model(cell)
    optimizer = torch.optim.Adam(model.parameters(), lr=cell.lr)
    generator = torch.Generator().manual_seed(0)
    model_epoch(model, optimizer, data[: cell.batch_size * 5], cell.batch_size, generator)  # warm-up

    def once() -> float:
        started = time.perf_counter()
        model_epoch(model, optimizer, data, cell.batch_size, generator)
        return len(data) / (time.perf_counter() - started)

    return best_of(once)


def measure_standard(cell, images: int, data_root: str, threads: int) -> float:
    from torchvision import datasets, transforms

    set_threads(threads)
    dataset = datasets.MNIST(torchvision_root(data_root), train=True, transform=transforms.ToTensor())
    loader = torch.utils.data.DataLoader(dataset, batch_size=cell.batch_size, shuffle=True)
    torch.manual_seed(0)
    model = build_model(cell)
    optimizer = torch.optim.Adam(model.parameters(), lr=cell.lr)
    for step, (x, _) in enumerate(loader):  # the same warm-up as the engine
        standard_step(model, optimizer, x, cell)
        if step == 4:
            break

    def once() -> float:
        seen, started = 0, time.perf_counter()
        for x, _ in loader:
            standard_step(model, optimizer, x, cell)
            seen += len(x)
            if seen >= images:
                break
        return seen / (time.perf_counter() - started)

    return best_of(once)


def measure_compute_bound(cell, steps: int, threads: int) -> float:
    set_threads(threads)
    torch.manual_seed(0)
    model = build_model(cell)
    optimizer = torch.optim.Adam(model.parameters(), lr=cell.lr)
    x = torch.rand(cell.batch_size, 1, 28, 28).round()

    def step():
        loss = model.loss_terms(x)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        optimizer.step()

    for _ in range(5):
        step()

    def once() -> float:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        return steps * cell.batch_size / (time.perf_counter() - started)

    return best_of(once)


class TrainingLoss(torch.nn.Module):
    """A model whose forward is its mean training loss, for torch.func.functional_call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.loss_terms(x)["loss"].mean()


def measure_stacked(cell, images: int, copies: int, threads: int) -> float:
    """Images per second, summed over `copies` models of one cell (different seeds) trained as one stacked
    model with torch.func.vmap: the grid-level speed-up candidate (compare with the engine's rate)."""
    import copy

    from torch.func import functional_call, stack_module_state, vmap

    set_threads(threads)
    data = images_to_tensor(load_prepared(PREPARED_FILE)["train_images"][:images])
    models = []
    for seed in range(copies):
        torch.manual_seed(seed)
        models.append(build_model(cell))
    losses = [TrainingLoss(model) for model in models]
    params, buffers = stack_module_state(losses)
    template = copy.deepcopy(losses[0]).to("meta")

    def loss_of_one(p, b, x):
        return functional_call(template, (p, b), (x,))

    loss_of_all = vmap(loss_of_one, randomness="different")
    optimizer = torch.optim.Adam(params.values(), lr=cell.lr)
    generator = torch.Generator().manual_seed(0)
    orders = torch.stack([torch.randperm(len(data), generator=generator) for _ in range(copies)])

    def run(limit: int) -> None:
        for start in range(0, limit, cell.batch_size):
            x = data[orders[:, start : start + cell.batch_size]]  # (copies, batch, 1, 28, 28)
            loss = loss_of_all(params, buffers, x).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    run(cell.batch_size * 5)  # warm-up

    def once() -> float:
        started = time.perf_counter()
        run(len(data))
        return copies * len(data) / (time.perf_counter() - started)

    return best_of(once)


def _run(queue, function, args):
    queue.put((function(*args), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def in_fresh_process(function, *args) -> tuple[float, float]:
    """(result, peak resident memory in MiB) of function(*args) run in a new process. A process that dies
    (its traceback is printed above) raises here instead of leaving the parent waiting."""
    from queue import Empty

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_run, args=(queue, function, args))
    process.start()
    while True:
        try:
            result = queue.get(timeout=1)
            break
        except Empty:
            if not process.is_alive() and queue.empty():
                raise VaebenchError(
                    f"the benchmark process for {function.__name__} exited with code {process.exitcode} "
                    "without a result; its error is printed above"
                ) from None
    process.join()
    return result


def measure_architectures(config: StudyConfig, cells: list[str], images: int, copies: int) -> list[dict]:
    rows = []
    for name in cells:
        cell = dataclasses.replace(config.cell(name), device="cpu")
        threads = config.threads
        engine, engine_mem = in_fresh_process(measure_engine, cell, images, threads)
        standard, standard_mem = in_fresh_process(measure_standard, cell, images, config.data.root, threads)
        steps = max(20, images // cell.batch_size)
        bound, bound_mem = in_fresh_process(measure_compute_bound, cell, steps, threads)
        stacked, stacked_mem = in_fresh_process(measure_stacked, cell, images, copies, threads)
        flops_per_image = training_step_flops(cell, cell.batch_size) / cell.batch_size
        rows.append(
            {
                "cell": name,
                "family": cell.family,
                "arch": cell.arch,
                "batch_size": cell.batch_size,
                "gflop_per_image": flops_per_image / 1e9,
                "engine_images_per_s": engine,
                "standard_images_per_s": standard,
                "compute_bound_images_per_s": bound,
                "engine_over_standard": engine / standard,
                "engine_over_compute_bound": engine / bound,
                "engine_gflops": engine * flops_per_image / 1e9,
                "stacked_copies": copies,
                "stacked_images_per_s": stacked,
                "stacked_over_engine": stacked / engine,
                "peak_memory_mib": {
                    "engine": engine_mem,
                    "standard": standard_mem,
                    "compute_bound": bound_mem,
                    "stacked": stacked_mem,
                },
            }
        )
    return rows
