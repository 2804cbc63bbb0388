"""`vaebench bench`: every measurement, in order, after the cells are checked."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch

from pipeline.bench.processes import whole_process
from pipeline.bench.study import study_wall_time
from pipeline.bench.throughput import matmul_gflops, measure_architectures
from pipeline.config import StudyConfig
from pipeline.data import (
    DataError,
    missing_files,
    raw_dir,
)
from pipeline.engine import set_threads
from pipeline.models import build_model
from pipeline.paths import CLASSIFIER_FILE, PREPARED_FILE

log = logging.getLogger(__name__)


def check_bench_cells(config: StudyConfig, cells: list[str], reference_cell: str | None) -> None:
    """Before any measurement: every cell can be measured every way, and the full-training comparison,
    which compares test ELBOs, has a cell with one."""
    from pipeline.config import ConfigError
    from pipeline.models import FAMILIES, Autoencoder, family_names

    def steppable(family) -> bool:
        """Trained by the contract's step: one gradient step on one loss (what every measurement times)."""
        return family.train_step is Autoencoder.train_step and not family.capabilities.one_pass

    for name in [*cells, *([reference_cell] if reference_cell else [])]:
        family = FAMILIES[config.cell(name).family]
        if family.train_step is not Autoencoder.train_step:
            raise ConfigError(
                f"cell {name}: family {family.family} trains with a step of its own (alternating players, or a "
                "codebook's moving averages), which the standard loop and the stacked and FLOP-count measurements "
                f"(one loss, one gradient step) do not; benchmark a {family_names(steppable)} cell"
            )
        if family.capabilities.one_pass:
            raise ConfigError(
                f"cell {name}: family {family.family} is fitted in closed form, with no training steps to "
                f"measure; benchmark a {family_names(steppable)} cell"
            )
    for name in cells:
        cell = config.cell(name)
        if build_model(cell).loss_differentiates_input:
            raise ConfigError(
                f"cell {name}: its {cell.family} penalty differentiates through the input images, which the stacked "
                "(vmap) and FLOP-count measurements cannot trace; benchmark a cell of another family, or a "
                "one-hidden-layer linear CAE (its penalty is in closed form)"
            )
    if reference_cell and not FAMILIES[config.cell(reference_cell).family].capabilities.likelihood_bound:
        raise ConfigError(
            f"--reference-cell {reference_cell}: the full-training comparison reads the test ELBO, which family "
            f"{config.cell(reference_cell).family} has not; choose a "
            f"{family_names(lambda family: family.capabilities.likelihood_bound)} cell or pass --no-full"
        )


def run_bench(
    config: StudyConfig,
    cells: list[str],
    images: int,
    reference_cell: str | None,
    copies: int = 4,
    study: bool = False,
    runs: int = 3,
    params_file: Path = Path("params.yaml"),
) -> dict:
    """`runs` repeats of the throughput and whole-process measurements (this machine's timings vary from run
    to run; the table shows the median and the range); the study is timed once."""
    check_bench_cells(config, cells, reference_cell)
    # Checked here: each measurement process would die on them one by one.
    if not PREPARED_FILE.is_file():
        raise DataError(f"prepared data {PREPARED_FILE} is missing; run `dvc repro prepare` first")
    if reference_cell and not CLASSIFIER_FILE.is_file():
        raise DataError(
            f"{CLASSIFIER_FILE} is missing (the evaluate stage of the whole-process comparison "
            "scores samples with it); run `dvc repro classifier` first, or pass --no-full"
        )
    if missing_files(config.data.root):  # the standard loop reads the raw files with torchvision
        raise DataError(
            f"MNIST files missing in {raw_dir(config.data.root)}: {', '.join(missing_files(config.data.root))}"
        )
    set_threads(config.threads)
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
