"""Whole processes side by side: the classic PyTorch-examples recipe (benchmarks/reference_vae.py) beside
`python -m pipeline train CELL` and `evaluate CELL`, with each stage's time by part from its MLflow run."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from pipeline.config import StudyConfig
from pipeline.errors import VaebenchError
from pipeline.outputs import read_json
from pipeline.paths import METRICS_FILE, evaluate_dir

log = logging.getLogger(__name__)

REFERENCE_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "reference_vae.py"


def timed_process(command: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    """(wall seconds, stdout) of a whole process, start-up included; its output is shown if it fails."""
    import subprocess

    started = time.perf_counter()
    try:
        finished = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    except FileNotFoundError:
        raise VaebenchError(
            f"{command[0]} not found; run the bench from the project's environment (make setup)"
        ) from None
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
    """Whether the cell is the classic recipe's model: the 784-400-20-400-784 MLP VAE, Bernoulli, batch 128,
    Adam 1e-3."""
    from pipeline.models import FAMILIES, LAB_FAMILY

    recipe = (cell.arch, tuple(cell.hidden), cell.latent_dim, cell.batch_size, cell.lr, cell.likelihood)
    plain = cell.family == LAB_FAMILY and FAMILIES[cell.family].is_plain(cell.settings)
    return plain and recipe == ("linear", (400,), 20, 128, 1e-3, "bernoulli")


def whole_process(config: StudyConfig, cell_name: str, params_file: Path) -> dict:
    """The classic recipe (benchmarks/reference_vae.py, on the first `train_size` of torchvision's training
    images, testing on all 10,000 test images every epoch) and `python -m pipeline train CELL` then
    `evaluate CELL` (the prepared split, validation every epoch), each timed as a whole process, start-up,
    data loading and logging included, with the same number of training images and epochs, in a scratch
    folder with its own MLflow store (created beforehand, as a study's first stage would have). Images per
    second and the test ELBO of each; `same_network` says whether the cell is the recipe's model."""
    import sys
    import tempfile

    from pipeline.engine import resolve_device

    cell = config.cell(cell_name)
    repository = Path.cwd()
    env = subprocess_env(config)
    reference_seconds, printed = timed_process(
        [
            sys.executable,
            str(REFERENCE_SCRIPT),
            "--epochs",
            str(cell.epochs),
            "--train-images",
            str(config.data.train_size),
            "--params",
            str(params_file.resolve()),
        ],
        repository,
        env,
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
        test_elbo = read_json(work / evaluate_dir(config.study, cell_name) / METRICS_FILE)["elbo"]
    images = cell.epochs * config.data.train_size
    return {
        "cell": cell_name,
        "same_network": reference_network(cell),
        "device": str(resolve_device(cell.device)),
        "epochs": cell.epochs,
        "train_images": config.data.train_size,
        "reference": {
            "seconds": reference_seconds,
            "images_per_s": images / reference_seconds,
            "test_elbo": reference_elbo,
        },
        "train": {
            "seconds": train_seconds,
            "images_per_s": images / train_seconds,
            "import_seconds": import_seconds,
            "parts": seconds_by_part(metrics, "train"),
        },
        "evaluate": {
            "seconds": evaluate_seconds,
            "parts": seconds_by_part(metrics, "evaluate"),
            "test_elbo": test_elbo,
        },
        "train_over_reference": reference_seconds / train_seconds,
        "test_elbo_difference": test_elbo - reference_elbo,
    }


# How DVC 3 announces each stage of `dvc repro`, run or not (dvc/stage/run.py, stage/__init__.py, stage/cache.py).
