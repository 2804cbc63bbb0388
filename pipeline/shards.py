"""`vaebench repro --shard I/N`: one of N machines (or terminals, or jobs of a Slurm array) reproduces its
share of a study's cells, on DVC's own machinery.

Cells are deterministic DVC stages, so machines share work through the default DVC remote: each shard
reproduces the train and evaluate stages of its cells (with the shared prepare and classifier stages, which are
deterministic) with `dvc repro --pull`, so a stage that any machine already ran is restored from the remote's
run-cache instead of run again, then pushes its outputs and the run-cache. Afterwards `dvc repro --pull` on any
clone restores every cell and runs only the report. Runs go to one tracking server (MLFLOW_TRACKING_URI),
under one parent run.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

from pipeline import tracking
from pipeline.config import ConfigError, StudyConfig
from pipeline.errors import VaebenchError
from pipeline.paths import evaluate_stage, train_stage

log = logging.getLogger(__name__)
ARRAY_INDEX = "SLURM_ARRAY_TASK_ID"
ARRAY_COUNT = "SLURM_ARRAY_TASK_COUNT"
ARRAY_MIN = "SLURM_ARRAY_TASK_MIN"
ARRAY_STEP = "SLURM_ARRAY_TASK_STEP"


def parse_shard(text: str | None, environ: dict = os.environ) -> tuple[int, int]:
    """(index, count) from `I/N` (I counts from 0), or from a Slurm job array's variables."""
    if text is None:
        if ARRAY_INDEX not in environ or ARRAY_COUNT not in environ:
            raise ConfigError(
                f"say which share to run: --shard I/N (I = 0..N-1), or run inside a Slurm job array "
                f"({ARRAY_INDEX} and {ARRAY_COUNT} are not set)"
            )
        try:
            offset = int(environ[ARRAY_INDEX]) - int(environ.get(ARRAY_MIN, "0"))
            step = int(environ.get(ARRAY_STEP, "1"))
            count = int(environ[ARRAY_COUNT])
        except ValueError:
            raise ConfigError(f"{ARRAY_INDEX}, {ARRAY_MIN}, {ARRAY_STEP} and {ARRAY_COUNT} must be integers") from None
        if step < 1 or offset % step or not 0 <= offset // step < count:
            raise ConfigError(
                f"the Slurm array task {environ[ARRAY_INDEX]} is not one of {count} evenly spaced tasks "
                f"(--array=MIN-MAX[:STEP] without gaps); give --shard I/N instead"
            )
        text = f"{offset // step}/{count}"
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or int(match[2]) < 1 or int(match[1]) >= int(match[2]):
        raise ConfigError(f"--shard must be I/N with 0 <= I < N, got {text!r}")
    return int(match[1]), int(match[2])


def shard_cells(config: StudyConfig, index: int, count: int) -> list[str]:
    """Cell i of the `cells:` block goes to share i mod N; a fine-tuned cell goes with the cell it starts from
    (its stage needs that cell's model). Every cell is in exactly one share."""
    plain = [name for name, cell in config.cells.items() if not cell.init_from]
    mine = {name for position, name in enumerate(plain) if position % count == index}
    return [name for name, cell in config.cells.items() if (cell.init_from or name) in mine]


def shard_stages(config: StudyConfig, cells: list[str]) -> list[str]:
    return [stage for name in cells for stage in (train_stage(config.cells[name]), evaluate_stage(config.cells[name]))]


def dvc_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *arguments]


def dvc(*arguments: str) -> None:
    """`dvc ARGUMENTS` here; an interrupt ends its stage, which ends its MLflow run KILLED."""
    from pipeline.server import end_group

    log.info("$ dvc %s", " ".join(arguments))
    process = subprocess.Popen(dvc_command(*arguments), start_new_session=True)
    try:
        returncode = process.wait()
    except BaseException:
        end_group(process.pid)
        raise
    if returncode != 0:
        raise VaebenchError(f"`dvc {' '.join(arguments)}` failed (exit {returncode}; its output is above)")


def check_remote() -> None:
    default = subprocess.run(dvc_command("remote", "default"), capture_output=True, text=True)
    if default.returncode != 0:  # "No default remote set"
        raise ConfigError(
            "shards share their outputs through the default DVC remote, and there is none; add one that "
            "every machine reaches: dvc remote add -d shared /shared/vaebench-cache (or s3://..., ssh://...)"
        )


def repro_shard(config: StudyConfig, index: int, count: int, push: bool = True) -> list[str]:
    if not tracking.tracking_uri().startswith(("http://", "https://")):
        raise ConfigError(
            "shards on several machines must log to one tracking server: set MLFLOW_TRACKING_URI="
            "http://HOST:PORT (start one with `vaebench server start`)"
        )
    check_remote()
    tracking.check_store()
    tracking.ensure_study(config)  # the experiment and its one parent run, before any stage starts
    cells = shard_cells(config, index, count)
    if not cells:
        log.info("shard %d/%d: no cells (the study has fewer cells than shards)", index, count)
        return []
    log.info("shard %d/%d: %d of %d cells: %s", index, count, len(cells), len(config.cells), ", ".join(cells))
    # --pull: a stage found in the remote's run-cache is restored from there (its outputs downloaded), not run.
    dvc("repro", "--pull", *shard_stages(config, cells))
    if push:  # every output this clone has (the shared stages' too), and the run-cache that restores them
        dvc("push", "--run-cache")
    return cells
