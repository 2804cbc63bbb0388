"""`vaebench bench`: how fast the training engine is, side by side with the standard loop and the compute bound.

For each architecture, images per second of
  (a) the engine (pipeline/train.py: images resident on the device, index-permutation shuffling,
      loss sums read once per epoch),
  (b) the standard loop: torchvision's MNIST with the ToTensor transform behind a shuffling DataLoader,
      a `.item()` per step,
  (c) the compute bound: forward, backward and optimizer step on one pre-made batch in a tight loop,
with achieved GFLOP/s (FLOPs counted by torch's FlopCounterMode) against the measured float32 matmul
GFLOP/s, and each measurement's peak memory (it runs in a fresh process). Each rate is the best of 3
timed repeats after a warm-up. Writes reports/benchmarks/.
"""

from __future__ import annotations

import dataclasses
import gzip
import multiprocessing
import os
import platform
import resource
import shutil
import time
from pathlib import Path

import torch

from pipeline.config import StudyConfig
from pipeline.data import MNIST_SHA256, DataError, images_to_tensor, load_prepared, missing_files, raw_dir
from pipeline.errors import VaebenchError
from pipeline.engine import model_epoch, set_threads
from pipeline.models import build_model
from pipeline.outputs import PREPARED_FILE, write_json, write_text

OUT_DIR = Path("reports") / "benchmarks"
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


def measure_engine(cell, images: int) -> float:
    set_threads()
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


def measure_standard(cell, images: int, data_root: str) -> float:
    from torchvision import datasets, transforms

    set_threads()
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


def measure_compute_bound(cell, steps: int) -> float:
    set_threads()
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


def measure_stacked(cell, images: int, copies: int) -> float:
    """Images per second, summed over `copies` models of one cell (different seeds) trained as one stacked
    model with torch.func.vmap: the grid-level speed-up candidate (compare with the engine's rate)."""
    import copy

    from torch.func import functional_call, stack_module_state, vmap

    set_threads()
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


def train_split_indices(config: StudyConfig):
    """The training images of the prepared split, as indices into torchvision's 60,000 (see data.split)."""
    import numpy as np

    order = np.random.default_rng(config.data.split_seed).permutation(60_000)
    return np.sort(order[: config.data.train_size]).tolist()


def ten_epochs(config: StudyConfig, cell_name: str, loop: str) -> dict:
    """Train a cell for its epochs with the engine or the standard loop on the same training images,
    then the test ELBO of the result (one z sample per image, seeded like the evaluate stage)."""
    from torchvision import datasets, transforms

    from pipeline.evaluate import reconstruction_metrics

    set_threads()
    cell = dataclasses.replace(config.cell(cell_name), device="cpu")
    arrays = load_prepared(PREPARED_FILE)
    torch.manual_seed(cell.seed)
    model = build_model(cell)
    optimizer = torch.optim.Adam(model.parameters(), lr=cell.lr)
    started = time.perf_counter()
    if loop == "engine":
        images, generator = images_to_tensor(arrays["train_images"]), torch.Generator().manual_seed(cell.seed)
        for _ in range(cell.epochs):
            model_epoch(model, optimizer, images, cell.batch_size, generator)
    else:
        dataset = datasets.MNIST(torchvision_root(config.data.root), train=True, transform=transforms.ToTensor())
        subset = torch.utils.data.Subset(dataset, train_split_indices(config))
        loader = torch.utils.data.DataLoader(subset, batch_size=cell.batch_size, shuffle=True)
        for _ in range(cell.epochs):
            for x, _ in loader:
                standard_step(model, optimizer, x, cell)
    seconds = time.perf_counter() - started
    torch.manual_seed(config.evaluate.seed)
    metrics, _ = reconstruction_metrics(model.eval(), images_to_tensor(arrays["test_images"]), 1000)
    return {"seconds": seconds, "test_elbo": metrics["elbo"]}


def study_wall_time(config: StudyConfig) -> dict:
    """Seconds of `dvc repro` from clean: the committed repository cloned into a temporary folder (no
    results, no DVC cache), reading the same MNIST files."""
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        clone = Path(scratch) / "repo"
        subprocess.run(["git", "clone", "--quiet", str(Path.cwd()), str(clone)], check=True)
        env = {**os.environ, "VAEBENCH_DATA_ROOT": str(Path(config.data.root).resolve()), "DVC_NO_ANALYTICS": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        started = time.perf_counter()
        subprocess.run(["dvc", "repro"], cwd=clone, env=env, check=True, capture_output=True)
        seconds = time.perf_counter() - started
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    return {"seconds": seconds, "commit": commit, "cells": len(config.cells)}


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


def check_bench_cells(config: StudyConfig, cells: list[str], reference_cell: str | None) -> None:
    """Before any measurement: every cell can be measured every way, and the full-training comparison,
    which compares test ELBOs, has a cell with one."""
    from pipeline.config import ConfigError
    from pipeline.models import FAMILIES

    for name in [*cells, *([reference_cell] if reference_cell else [])]:
        if FAMILIES[config.cell(name).family].capabilities.adversarial:
            raise ConfigError(
                f"cell {name}: family {config.cell(name).family} trains with alternating player steps, which the standard "
                "loop and the stacked and FLOP-count measurements (one loss, one step) do not; benchmark a vae, ae, dae or cae cell"
            )
    for name in cells:
        cell = config.cell(name)
        if build_model(cell).loss_differentiates_input:
            raise ConfigError(
                f"cell {name}: its {cell.family} penalty differentiates through the input images, which the stacked "
                "(vmap) and FLOP-count measurements cannot trace; benchmark a vae, ae, dae or one-hidden-layer linear cae cell"
            )
    if reference_cell and not FAMILIES[config.cell(reference_cell).family].capabilities.likelihood_bound:
        raise ConfigError(
            f"--reference-cell {reference_cell}: the full-training comparison reads the test ELBO, which family "
            f"{config.cell(reference_cell).family} has not; choose a vae cell or pass --no-full"
        )


def run_bench(config: StudyConfig, cells: list[str], images: int, reference_cell: str | None, copies: int = 4,
              study: bool = False) -> dict:
    check_bench_cells(config, cells, reference_cell)
    # Checked here: each measurement process would die on them one by one.
    if not PREPARED_FILE.is_file():
        raise DataError(f"prepared data {PREPARED_FILE} is missing; run `dvc repro prepare` first")
    if missing_files(config.data.root):  # the standard loop reads the raw files with torchvision
        raise DataError(f"MNIST files missing in {raw_dir(config.data.root)}: {', '.join(missing_files(config.data.root))}")
    set_threads()
    results = {
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "matmul_gflops": matmul_gflops(),
        },
        "architectures": [],
    }
    for name in cells:
        cell = dataclasses.replace(config.cell(name), device="cpu")
        engine, engine_mem = in_fresh_process(measure_engine, cell, images)
        standard, standard_mem = in_fresh_process(measure_standard, cell, images, config.data.root)
        bound, bound_mem = in_fresh_process(measure_compute_bound, cell, max(20, images // cell.batch_size))
        stacked, stacked_mem = in_fresh_process(measure_stacked, cell, images, copies)
        flops_per_image = training_step_flops(cell, cell.batch_size) / cell.batch_size
        results["architectures"].append(
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
                "engine_share_of_matmul_peak": engine * flops_per_image / 1e9 / results["machine"]["matmul_gflops"],
                "stacked_copies": copies,
                "stacked_images_per_s": stacked,
                "stacked_over_engine": stacked / engine,
                "peak_memory_mib": {
                    "engine": engine_mem, "standard": standard_mem, "compute_bound": bound_mem, "stacked": stacked_mem
                },
            }
        )
    if reference_cell:
        engine, _ = in_fresh_process(ten_epochs, config, reference_cell, "engine")
        standard, _ = in_fresh_process(ten_epochs, config, reference_cell, "standard")
        results["full_training"] = {
            "cell": reference_cell,
            "epochs": config.cell(reference_cell).epochs,
            "engine": engine,
            "standard": standard,
            "time_ratio": engine["seconds"] / standard["seconds"],
            "test_elbo_difference": engine["test_elbo"] - standard["test_elbo"],
        }
    if study:
        results["study_repro"] = study_wall_time(config)
    return results


def table(results: dict) -> str:
    lines = [
        f"matmul float32: {results['machine']['matmul_gflops']:.0f} GFLOP/s on {results['machine']['cpu_threads']} threads",
        "",
        "| cell | (a) engine img/s | (b) standard img/s | (c) bound img/s | a/b | a/c | engine GFLOP/s | of matmul "
        "| stacked img/s (× engine) | peak MiB a / b / c |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["architectures"]:
        memory = row["peak_memory_mib"]
        lines.append(
            f"| {row['cell']} | {row['engine_images_per_s']:.0f} | {row['standard_images_per_s']:.0f} | "
            f"{row['compute_bound_images_per_s']:.0f} | {row['engine_over_standard']:.2f} | "
            f"{row['engine_over_compute_bound']:.2f} | {row['engine_gflops']:.0f} | "
            f"{row['engine_share_of_matmul_peak']:.0%} | {row['stacked_images_per_s']:.0f} ({row['stacked_over_engine']:.2f}×, "
            f"{row['stacked_copies']} seeds) | {memory['engine']:.0f} / {memory['standard']:.0f} / {memory['compute_bound']:.0f} |"
        )
    full = results.get("full_training")
    if full:
        lines += [
            "",
            f"{full['epochs']}-epoch training of {full['cell']}: engine {full['engine']['seconds']:.1f} s "
            f"(test ELBO {full['engine']['test_elbo']:.2f}), standard loop {full['standard']['seconds']:.1f} s "
            f"(test ELBO {full['standard']['test_elbo']:.2f}): {full['time_ratio']:.0%} of the time, "
            f"ELBO difference {full['test_elbo_difference']:+.2f} nats/image",
        ]
    study = results.get("study_repro")
    if study:
        lines += ["", f"dvc repro of the study from clean ({study['cells']} cells): {study['seconds'] / 60:.1f} min"]
    return "\n".join(lines)


def write_results(results: dict) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write_json(OUT_DIR / "bench.json", results)
    write_text(OUT_DIR / "bench.md", table(results) + "\n")
    return OUT_DIR / "bench.json"

