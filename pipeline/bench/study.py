"""`vaebench bench --study`: `dvc repro` of the committed study from clean in a temporary clone, timed by
stage, with every output checked against the commit's dvc.lock."""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path

from pipeline.bench.processes import run_metrics, seconds_by_part, subprocess_env
from pipeline.bench.tables import OUT_DIR
from pipeline.config import StudyConfig
from pipeline.errors import VaebenchError
from pipeline.paths import study_metrics_file

log = logging.getLogger(__name__)

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
        cloned = subprocess.run(
            ["git", "clone", "--quiet", str(Path.cwd()), str(clone)], capture_output=True, text=True
        )
        if cloned.returncode != 0:
            raise VaebenchError(
                f"git clone of {Path.cwd()} failed: {cloned.stderr.strip()}; run the bench in the repository"
            )
        committed_lock = clone / "dvc.lock"
        committed = output_hashes(yaml.safe_load(committed_lock.read_text())) if committed_lock.is_file() else {}
        study = load_study(clone / "params.yaml")
        env = subprocess_env(config)
        lines, started = [], time.perf_counter()
        try:
            process = subprocess.Popen(
                ["dvc", "repro"],
                cwd=clone,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
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
        study_metrics = clone / study_metrics_file(study.study)
        if study_metrics.is_file():
            shutil.copyfile(study_metrics, kept / "metrics.json")
    return {
        "seconds": seconds,
        "commit": commit,
        "cells": len(study.cells),
        "stages": stage_seconds(lines, seconds),
        "cell_parts": cells,
        "outputs_compared": len(compared),
        "outputs_differing": differing,
    }


def output_hashes(lock: dict) -> dict[str, str]:
    """path -> md5 of every output a dvc.lock records (reports excepted: they embed timings and run ids)."""
    return {
        out["path"]: out["md5"]
        for stage in lock.get("stages", {}).values()
        for out in stage.get("outs", [])
        if not out["path"].startswith("reports/") and not out["path"].endswith("mlflow_run.json")
    }
