"""`vaebench bench`: how fast training and the study are, side by side with the standard loop, the classic
recipe and the compute bound. Writes reports/benchmarks/.

Per architecture, images per second of
  (a) the engine (pipeline/engine.py: images resident on the device, index-permutation shuffling, loss
      sums read once per epoch),
  (b) the standard loop: torchvision's MNIST with the ToTensor transform behind a shuffling DataLoader,
      a `.item()` per step,
  (c) the compute bound: forward, backward and optimizer step on one pre-made batch in a tight loop,
with achieved GFLOP/s (FLOPs counted by torch's FlopCounterMode) against the measured float32 matmul
GFLOP/s, and each measurement's peak memory (each runs in a fresh process; each rate is the best of 3
timed repeats after a warm-up). Then whole processes: the classic PyTorch-examples recipe
(benchmarks/reference_vae.py) beside `python -m pipeline train CELL` and `evaluate CELL`, start-up and
logging included, with each stage's time by part. All of it is repeated `--runs` times (the table shows
the median and range). `--study` times `dvc repro` of the committed study from clean, by stage.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import multiprocessing
import os
import platform
import re
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
from pipeline.outputs import CLASSIFIER_DIR, PREPARED_FILE, write_json, write_text

log = logging.getLogger(__name__)

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


REFERENCE_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reference_vae.py"


def timed_process(command: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    """(wall seconds, stdout) of a whole process, start-up included; its output is shown if it fails."""
    import subprocess

    started = time.perf_counter()
    try:
        finished = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    except FileNotFoundError:
        raise VaebenchError(f"{command[0]} not found; run the bench from the project's environment (make setup)") from None
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise VaebenchError(f"{' '.join(command)} exited with code {finished.returncode}:\n{finished.stderr[-3000:]}")
    return seconds, finished.stdout


def run_metrics(store: str, study: str, cell: str) -> dict[str, float]:
    """The latest metrics of a cell's run in an MLflow store."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import experiment_name

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name(experiment_name(study))
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{cell}'")
    return runs[0].data.metrics if runs else {}


def seconds_by_part(metrics: dict[str, float], stage: str) -> dict[str, float]:
    """The stage's time by part, as tracking.log_stage_seconds logged it."""
    prefix = f"seconds_{stage}_"
    return {key.removeprefix(prefix): value for key, value in metrics.items() if key.startswith(prefix)}


def subprocess_env(config: StudyConfig) -> dict[str, str]:
    """The environment of the timed processes: this checkout's code and programs, the same MNIST files."""
    import sys

    env = {
        **os.environ,
        "VAEBENCH_DATA_ROOT": str(Path(config.data.root).resolve()),
        "DVC_NO_ANALYTICS": "1",
        "PYTHONPATH": str(REFERENCE_SCRIPT.parents[1]),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("DVC_ROOT", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def reference_network(cell) -> bool:
    """Whether the cell is the classic recipe's model: the 784-400-20-400-784 MLP VAE, Bernoulli, batch 128, Adam 1e-3."""
    return (cell.family, cell.arch, tuple(cell.hidden), cell.latent_dim, cell.batch_size, cell.lr, cell.likelihood) == (
        "vae", "linear", (400,), 20, 128, 1e-3, "bernoulli") and cell.settings.beta == 1.0


def whole_process(config: StudyConfig, cell_name: str, params_file: Path) -> dict:
    """The classic recipe (benchmarks/reference_vae.py, on the first `train_size` of torchvision's training
    images, testing on all 10,000 test images every epoch) and `python -m pipeline train CELL` then
    `evaluate CELL` (the prepared split, validation every epoch), each timed as a whole process, start-up,
    data loading and logging included, with the same number of training images and epochs, in a scratch
    folder with its own MLflow store (created beforehand, as a study's first stage would have). Images per
    second and the test ELBO of each; `same_network` says whether the cell is the recipe's model."""
    import subprocess
    import sys
    import tempfile

    from pipeline.engine import resolve_device

    cell = config.cell(cell_name)
    repository = Path.cwd()
    env = subprocess_env(config)
    reference_seconds, printed = timed_process(
        [sys.executable, str(REFERENCE_SCRIPT), "--epochs", str(cell.epochs), "--train-images", str(config.data.train_size),
         "--params", str(params_file.resolve())], repository, env,
    )
    last = printed.strip().splitlines()[-1] if printed.strip() else ""
    if "test loss " not in last:
        raise VaebenchError(f"{REFERENCE_SCRIPT.name} printed no test loss; its last line: {last!r}")
    reference_elbo = float(last.split("test loss ")[1].split()[0])
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        (work / "results").mkdir()
        for name in ("prepare", "classifier"):
            if (repository / "results" / name).exists():
                (work / "results" / name).symlink_to(repository / "results" / name)
        shutil.copyfile(params_file, work / "params.yaml")
        env["MLFLOW_TRACKING_URI"] = store = f"sqlite:///{work / 'mlflow.db'}"
        timed_process([sys.executable, "-c", "import mlflow; mlflow.MlflowClient().search_experiments()"], work, env)
        import_seconds, _ = timed_process([sys.executable, "-c", "import pipeline.train"], work, env)
        train_seconds, _ = timed_process([sys.executable, "-m", "pipeline", "train", cell_name], work, env)
        evaluate_seconds, _ = timed_process([sys.executable, "-m", "pipeline", "evaluate", cell_name], work, env)
        metrics = run_metrics(store, config.study, cell_name)
        test_elbo = json.loads((work / "results" / config.study / "evaluate" / cell_name / "metrics.json").read_text())["elbo"]
    images = cell.epochs * config.data.train_size
    return {
        "cell": cell_name,
        "same_network": reference_network(cell),
        "device": str(resolve_device(cell.device)),
        "epochs": cell.epochs,
        "train_images": config.data.train_size,
        "reference": {"seconds": reference_seconds, "images_per_s": images / reference_seconds, "test_elbo": reference_elbo},
        "train": {"seconds": train_seconds, "images_per_s": images / train_seconds, "import_seconds": import_seconds,
                  "parts": seconds_by_part(metrics, "train")},
        "evaluate": {"seconds": evaluate_seconds, "parts": seconds_by_part(metrics, "evaluate"), "test_elbo": test_elbo},
        "train_over_reference": reference_seconds / train_seconds,
        "test_elbo_difference": test_elbo - reference_elbo,
    }


# How DVC 3 announces each stage of `dvc repro`, run or not (dvc/stage/run.py, stage/__init__.py, stage/cache.py).
STAGE_LINE = re.compile(r"^(?:Running stage|Stage) '([^']+)'")


def stage_seconds(lines: list[tuple[float, str]], total: float) -> dict[str, float]:
    """Each stage's seconds from `dvc repro` output lines stamped with their arrival time: from the line
    announcing it to the next announcement (or the end). DVC's own start-up is `(dvc start-up)`."""
    starts = [(0.0, "(dvc start-up)")]
    for at, line in lines:
        match = STAGE_LINE.match(line.strip())
        if match:
            starts.append((at, match.group(1)))
    ends = [at for at, _ in starts[1:]] + [total]
    return {name: end - at for (at, name), end in zip(starts, ends)}


def study_wall_time(config: StudyConfig) -> dict:
    """`dvc repro` of the committed study from clean, in a temporary clone (no results, no DVC cache) reading
    the same MNIST files: its wall time, each stage's (stage_seconds), each cell's train and evaluate time
    by part (from the clone's MLflow store), and whether every output has the md5 that the committed
    dvc.lock records (the same numbers). The clone's dvc.lock and study metrics are kept in
    reports/benchmarks/study/."""
    import subprocess
    import tempfile

    import yaml

    from pipeline.config import load_study
    from pipeline.server import end_group

    with tempfile.TemporaryDirectory() as scratch:
        clone = Path(scratch) / "repo"
        cloned = subprocess.run(["git", "clone", "--quiet", str(Path.cwd()), str(clone)], capture_output=True, text=True)
        if cloned.returncode != 0:
            raise VaebenchError(f"git clone of {Path.cwd()} failed: {cloned.stderr.strip()}; run the bench in the repository")
        committed_lock = clone / "dvc.lock"
        committed = output_hashes(yaml.safe_load(committed_lock.read_text())) if committed_lock.is_file() else {}
        study = load_study(clone / "params.yaml")
        env = subprocess_env(config)
        lines, started = [], time.perf_counter()
        try:
            process = subprocess.Popen(["dvc", "repro"], cwd=clone, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, start_new_session=True)
        except FileNotFoundError:
            raise VaebenchError("dvc not found; run the bench from the project's environment (make setup)") from None
        try:
            for line in process.stdout:
                lines.append((time.perf_counter() - started, line))
            returncode = process.wait()
        except BaseException:  # Ctrl-C, SIGTERM: stop DVC and its stage before the clone is deleted
            end_group(process.pid)
            process.wait()
            raise
        seconds = time.perf_counter() - started
        if returncode != 0:
            raise VaebenchError("dvc repro of the study failed:\n" + "".join(line for _, line in lines[-40:]))
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
        store = f"sqlite:///{clone / 'mlflow.db'}"
        cells = {}
        for name in study.cells:
            metrics = run_metrics(store, study.study, name)
            cells[name] = {"train": seconds_by_part(metrics, "train"), "evaluate": seconds_by_part(metrics, "evaluate")}
        produced = output_hashes(yaml.safe_load((clone / "dvc.lock").read_text()))
        compared = committed.keys() & produced.keys()
        differing = sorted(path for path in compared if committed[path] != produced[path])
        kept = OUT_DIR / "study"
        kept.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(clone / "dvc.lock", kept / "dvc.lock")
        study_metrics = clone / "results" / study.study / "metrics.json"
        if study_metrics.is_file():
            shutil.copyfile(study_metrics, kept / "metrics.json")
    return {
        "seconds": seconds, "commit": commit, "cells": len(study.cells), "stages": stage_seconds(lines, seconds),
        "cell_parts": cells, "outputs_compared": len(compared), "outputs_differing": differing,
    }


def output_hashes(lock: dict) -> dict[str, str]:
    """path -> md5 of every output a dvc.lock records (reports excepted: they embed timings and run ids)."""
    return {
        out["path"]: out["md5"]
        for stage in lock.get("stages", {}).values()
        for out in stage.get("outs", [])
        if not out["path"].startswith("reports/") and not out["path"].endswith("mlflow_run.json")
    }


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


def measure_architectures(config: StudyConfig, cells: list[str], images: int, copies: int) -> list[dict]:
    rows = []
    for name in cells:
        cell = dataclasses.replace(config.cell(name), device="cpu")
        engine, engine_mem = in_fresh_process(measure_engine, cell, images)
        standard, standard_mem = in_fresh_process(measure_standard, cell, images, config.data.root)
        bound, bound_mem = in_fresh_process(measure_compute_bound, cell, max(20, images // cell.batch_size))
        stacked, stacked_mem = in_fresh_process(measure_stacked, cell, images, copies)
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
                    "engine": engine_mem, "standard": standard_mem, "compute_bound": bound_mem, "stacked": stacked_mem
                },
            }
        )
    return rows


def run_bench(config: StudyConfig, cells: list[str], images: int, reference_cell: str | None, copies: int = 4,
              study: bool = False, runs: int = 3, params_file: Path = Path("params.yaml")) -> dict:
    """`runs` repeats of the throughput and whole-process measurements (this machine's timings vary from run
    to run; the table shows the median and the range); the study is timed once."""
    check_bench_cells(config, cells, reference_cell)
    # Checked here: each measurement process would die on them one by one.
    if not PREPARED_FILE.is_file():
        raise DataError(f"prepared data {PREPARED_FILE} is missing; run `dvc repro prepare` first")
    if reference_cell and not (CLASSIFIER_DIR / "model.pt").is_file():
        raise DataError(f"{CLASSIFIER_DIR / 'model.pt'} is missing (the evaluate stage of the whole-process comparison "
                        "scores samples with it); run `dvc repro classifier` first, or pass --no-full")
    if missing_files(config.data.root):  # the standard loop reads the raw files with torchvision
        raise DataError(f"MNIST files missing in {raw_dir(config.data.root)}: {', '.join(missing_files(config.data.root))}")
    set_threads()
    results = {
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__,
            "matmul_gflops": [],
        },
        "runs": [],
    }
    for number in range(1, runs + 1):
        log.info("bench run %d of %d", number, runs)
        results["machine"]["matmul_gflops"].append(matmul_gflops())
        run = {"architectures": measure_architectures(config, cells, images, copies)}
        for row in run["architectures"]:
            row["engine_share_of_matmul_peak"] = row["engine_gflops"] / results["machine"]["matmul_gflops"][-1]
        if reference_cell:
            run["whole_process"] = whole_process(config, reference_cell, params_file)
        results["runs"].append(run)
    if study:
        log.info("timing dvc repro of the study from clean")
        results["study_repro"] = study_wall_time(config)
    return results


MISSING = "–"


def spread(values: list[float], digits: int = 0, scale: float = 1.0) -> str:
    """median (min–max) of repeated measurements."""
    values = sorted(value * scale for value in values)
    median = values[len(values) // 2] if len(values) % 2 else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
    if len(values) == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({values[0]:.{digits}f}–{values[-1]:.{digits}f})"


def table(results: dict) -> str:
    runs = results["runs"]
    machine = results["machine"]
    lines = [
        f"{len(runs)} run(s); each figure is the median (min–max) over them. matmul float32: "
        f"{spread(machine['matmul_gflops'])} GFLOP/s on {machine['cpu_threads']} threads ({machine['cpu_capability']})",
        "",
        "| cell | (a) engine img/s | (b) standard img/s | (c) bound img/s | a/b | a/c | engine GFLOP/s | of matmul "
        "| stacked/engine | peak MiB a / b / c |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for index, row in enumerate(runs[0]["architectures"]):
        rows = [run["architectures"][index] for run in runs]

        def over(key: str, digits: int = 0, scale: float = 1.0) -> str:
            return spread([r[key] for r in rows], digits, scale)

        memory = {key: spread([r["peak_memory_mib"][key] for r in rows]) for key in row["peak_memory_mib"]}
        lines.append(
            f"| {row['cell']} | {over('engine_images_per_s')} | {over('standard_images_per_s')} | "
            f"{over('compute_bound_images_per_s')} | {over('engine_over_standard', 2)} | {over('engine_over_compute_bound', 2)} | "
            f"{over('engine_gflops')} | {over('engine_share_of_matmul_peak', 0, 100)}% | "
            f"{over('stacked_over_engine', 2)} ({row['stacked_copies']} seeds) | "
            f"{memory['engine']} / {memory['standard']} / {memory['compute_bound']} |"
        )
    wholes = [run["whole_process"] for run in runs if "whole_process" in run]
    if wholes:
        first = wholes[0]

        def whole(path: tuple[str, ...], digits: int = 0) -> str:
            values = []
            for entry in wholes:
                for key in path:
                    entry = entry.get(key, {}) if isinstance(entry, dict) else {}
                if isinstance(entry, (int, float)):
                    values.append(entry)
            return spread(values, digits) if values else MISSING

        def parts(stage: str) -> str:
            names = dict.fromkeys(part for entry in wholes for part in entry[stage]["parts"])
            return ", ".join(f"{part} {whole((stage, 'parts', part), 1)}" for part in names)

        network = "the classic recipe's network" if first.get("same_network") else (
            "NOT the classic recipe's 784-400-20-400-784 network, so the rates compare different models")
        lines += [
            "",
            f"Whole processes, {first['epochs']} epochs on {first['train_images']:,} images; cell {first['cell']} "
            f"({network}) on {first.get('device', 'cpu')}, the classic recipe on cpu:",
            "",
            "| process | seconds | images/s | test ELBO (nats/image) |",
            "|---|---|---|---|",
            f"| classic recipe (benchmarks/reference_vae.py) | {whole(('reference', 'seconds'), 1)} | "
            f"{whole(('reference', 'images_per_s'))} | {whole(('reference', 'test_elbo'), 2)} |",
            f"| `python -m pipeline train {first['cell']}` | {whole(('train', 'seconds'), 1)} | "
            f"{whole(('train', 'images_per_s'))} | — |",
            f"| `python -m pipeline evaluate {first['cell']}` | {whole(('evaluate', 'seconds'), 1)} | — | "
            f"{whole(('evaluate', 'test_elbo'), 2)} |",
            "",
            f"train over the classic recipe: {whole(('train_over_reference',), 2)}×; test ELBO difference "
            f"{whole(('test_elbo_difference',), 2)} nats/image; `import pipeline.train` {whole(('train', 'import_seconds'), 1)} s",
            f"train stage by part (s): {parts('train')}",
            f"evaluate stage by part (s): {parts('evaluate')}",
        ]
    study = results.get("study_repro")
    if study:
        lines += ["", study_table(study)]
    return "\n".join(lines)


def study_table(study: dict) -> str:
    """The study's wall time by stage, and where each cell's train and evaluate time went."""
    if not study["outputs_compared"]:
        same = "no output to compare with (the commit has no dvc.lock, or none of these outputs)"
    elif not study["outputs_differing"]:
        same = "every output has the committed dvc.lock's md5"
    else:
        same = (f"{len(study['outputs_differing'])} outputs differ from the committed dvc.lock: "
                f"{', '.join(study['outputs_differing'][:5])}")
    lines = [
        f"dvc repro of the study from clean ({study['cells']} cells, commit {study['commit'][:7]}): "
        f"{study['seconds'] / 60:.1f} min; {study['outputs_compared']} outputs compared, {same}",
        "",
        "| stage | seconds | train: epochs / logging the model | evaluate: biggest parts |",
        "|---|---|---|---|",
    ]
    for stage, seconds in study["stages"].items():
        cell = stage.split("@", 1)[1] if "@" in stage else None
        parts = study["cell_parts"].get(cell, {})
        detail = ["", ""]
        if stage.startswith(("train@", "finetune@")) and parts.get("train"):
            detail[0] = f"{parts['train'].get('epochs', 0):.1f} / {parts['train'].get('log_model', 0):.1f}"
        if stage.startswith("evaluate") and parts.get("evaluate"):
            top = sorted(parts["evaluate"].items(), key=lambda item: -item[1])[:3]
            detail[1] = ", ".join(f"{part} {value:.1f}" for part, value in top)
        lines.append(f"| {stage} | {seconds:.1f} | {detail[0]} | {detail[1]} |")
    return "\n".join(lines)


def write_results(results: dict) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write_json(OUT_DIR / "bench.json", results)
    write_text(OUT_DIR / "bench.md", table(results) + "\n")
    return OUT_DIR / "bench.json"

