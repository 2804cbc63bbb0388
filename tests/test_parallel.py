"""`vaebench repro --jobs N`: how the study is cut into pieces of work, the workspaces, bad input, a failed job
and Ctrl-C. (Bitwise-equal metrics under --jobs 2 and a plain `dvc repro`: tests/test_pipeline_e2e.py.)"""

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from conftest import SHARED_DATA, TINY_STUDY, copy_repo
from pipeline.config import ConfigError, load_study
from pipeline.parallel import (
    WORKSPACES,
    busy_threads_sleep,
    check_jobs,
    default_jobs,
    forget_uncached,
    pieces,
    sync_workspace,
)

TINY_CELLS = load_study(TINY_STUDY).cells


def test_every_stage_of_the_study_is_in_exactly_one_piece_and_a_fine_tuned_cell_goes_with_its_source():
    config = load_study(TINY_STUDY)
    found = pieces(config)
    stages = [stage for piece in found for stage in piece.stages]
    expected = ["floor"]
    for name, cell in config.cells.items():
        kind = ("finetune", "evaluate-finetuned") if cell.init_from else ("train", "evaluate")
        expected += [f"{kind[0]}@{name}", f"{kind[1]}@{name}"]
    assert sorted(stages) == sorted(expected)
    source = next(piece for piece in found if piece.name == "linear-z2-b1-s0")
    assert source.stages == (
        "train@linear-z2-b1-s0",
        "evaluate@linear-z2-b1-s0",
        "finetune@gan-linear-z2-ft-s0",
        "evaluate-finetuned@gan-linear-z2-ft-s0",
    )
    costs = [piece.cost for piece in found]
    assert costs == sorted(costs, reverse=True)  # the longest pieces first
    assert found[0].name in {name for name, cell in config.cells.items() if cell.arch == "conv"}


@pytest.mark.parametrize("threads, cores, jobs", [(1, 2, 2), (2, 2, 1), (2, 16, 8), (4, 2, 1), (1, 1, 1)])
def test_the_default_jobs_fill_the_cores_at_the_studys_threads(threads, cores, jobs):
    assert default_jobs(threads, cores) == jobs


@pytest.mark.parametrize("jobs, threads, cores, sleep", [(2, 2, 2, True), (2, 1, 2, False), (1, 2, 2, False)])
def test_waiting_threads_sleep_only_when_the_jobs_threads_outnumber_the_cores(jobs, threads, cores, sleep):
    assert busy_threads_sleep(jobs, threads, cores) == ({"OMP_WAIT_POLICY": "PASSIVE"} if sleep else {})


@pytest.mark.parametrize(
    "jobs, message",
    [(0, "--jobs must be >= 1, got 0"), (-1, "--jobs must be >= 1"), (5, "--jobs 5 on 2 cores: at most 4")],
)
def test_impossible_jobs_are_refused_with_the_reason(jobs, message):
    with pytest.raises(ConfigError, match=message):
        check_jobs(jobs, cores=2)


def test_the_cli_refuses_zero_jobs_and_jobs_with_a_shard(workdir):
    command = [sys.executable, "-m", "pipeline", "repro"]
    zero = subprocess.run([*command, "--jobs", "0"], capture_output=True, text=True)
    assert zero.returncode == 2 and "--jobs: must be an integer >= 1, got '0'" in zero.stderr
    both = subprocess.run(
        [sys.executable, "-m", "pipeline", "--params", str(TINY_STUDY), "repro", "--jobs", "2", "--shard", "0/2"],
        capture_output=True,
        text=True,
    )
    assert both.returncode == 2, both.stderr
    assert "while --shard runs one share of it" in both.stderr and "Traceback" not in both.stderr


def test_a_workspace_is_this_working_tree_on_this_cache_with_its_own_results(tmp_path):
    root, workspace = tmp_path / "repo", tmp_path / "repo" / WORKSPACES / "0"
    (root / "pipeline").mkdir(parents=True)
    (root / ".dvc").mkdir()
    (root / "pipeline/stage.py").write_text("print('edited')\n")
    (root / ".dvc/config.local").write_text("[core]\n    remote = shared\n")
    (workspace / "pipeline").mkdir(parents=True)
    (workspace / "pipeline/gone.py").write_text("deleted here since the last run\n")
    (workspace / "results/kept").mkdir(parents=True)
    (workspace / "results/kept/model.pt").write_text("a stage output of the workspace\n")

    sync_workspace(root, workspace, ["pipeline/stage.py"], "/cache/of/the/repository", set())

    assert (workspace / "pipeline/stage.py").read_text() == "print('edited')\n"
    assert not (workspace / "pipeline/gone.py").exists()
    assert (workspace / "results/kept/model.pt").is_file()
    local = (workspace / ".dvc/config.local").read_text()
    assert "remote = shared" in local and "dir = /cache/of/the/repository" in local and "no_scm = true" in local
    assert (workspace / ".vaebench/resume").resolve() == (root / ".vaebench/resume").resolve()


def small_study(tmp_path: Path, cells: dict) -> Path:
    study = yaml.safe_load(TINY_STUDY.read_text())
    study["cells"], study["finetuned"] = cells, {}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(study, sort_keys=False))
    return copy_repo(tmp_path / "repo", params)


def repo_env() -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "VAEBENCH_DATA_ROOT": str(SHARED_DATA),
        "DVC_NO_ANALYTICS": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)  # the repository's own store
    return env


@pytest.fixture
def started():
    """Starts `vaebench repro --jobs` in a repository; afterwards ends whatever it left running (a failed
    assertion must not leave jobs training)."""
    processes = []

    def start(root: Path, jobs: int) -> tuple[subprocess.Popen, queue.Queue]:
        process, lines = start_repro(root, jobs)
        processes.append(process)
        return process, lines

    yield start
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def start_repro(root: Path, jobs: int) -> tuple[subprocess.Popen, queue.Queue]:
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "repro", "--jobs", str(jobs)],
        cwd=root,
        env=repo_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, which a terminal's Ctrl-C would reach as a whole
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in process.stdout] + [lines.put(None)], daemon=True
    ).start()
    return process, lines


def read_until(lines: queue.Queue, done, seconds: float = 240) -> list[str]:
    seen = []
    while not done(seen):
        line = lines.get(timeout=seconds)
        assert line is not None, "".join(seen)
        seen.append(line)
    return seen


def read_rest(lines: queue.Queue) -> list[str]:
    rest = []
    while (line := lines.get(timeout=120)) is not None:
        rest.append(line)
    return rest


def cell_runs(root: Path) -> dict[str, str]:
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vaebench-tiny")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`vaebench.role` = 'cell'")
    return {run.info.run_name: run.info.status for run in runs}


LONG = {"family": "ae", "arch": "linear", "latent_dim": 2, "seed": 0, "epochs": 300}


@pytest.mark.slow
def test_ctrl_c_stops_every_job_ends_their_runs_killed_and_restores_nothing(tmp_path, started):
    cells = {"ae-long-s0": LONG, "ae-long-s1": {**LONG, "seed": 1}}
    root = small_study(tmp_path, cells)
    process, lines = started(root, jobs=2)
    # both jobs are training, each past its first epoch's resume checkpoint (written after the epoch's line)
    read_until(lines, lambda seen: all(any(f"[{cell}] " in s and " epoch 2/" in s for s in seen) for cell in cells))
    os.killpg(process.pid, signal.SIGINT)
    output = "".join(read_rest(lines))
    assert process.wait(timeout=60) == 130, output
    assert "interrupted" in output
    assert cell_runs(root) == {cell: "KILLED" for cell in cells}  # none left RUNNING
    assert not (root / "results/tiny/train").exists()  # nothing restored into the workspace
    assert not list((root / WORKSPACES).glob("*/results/**/*.partial"))
    # each job's last finished epoch is in this repository's resume folder, whole (no .partial), for the next run
    assert sorted(path.name for path in (root / ".vaebench/resume/tiny").iterdir()) == [
        f"{c}.pt" for c in sorted(cells)
    ]
    status = subprocess.run(["dvc", "status"], cwd=root, capture_output=True, text=True, env=repo_env()).stdout
    assert all(f"train@{cell}" in status for cell in cells)


@pytest.mark.slow
def test_a_failed_job_is_named_with_its_log_and_the_other_finishes_its_stage_then_nothing_is_restored(
    tmp_path, started
):
    cells = {
        "ae-diverges-s0": {"family": "ae", "arch": "linear", "latent_dim": 2, "seed": 0, "lr": 1.0e30},
        "ae-linear-z2-s0": {"family": "ae", "arch": "linear", "latent_dim": 2, "seed": 0, "epochs": 20},
    }
    root = small_study(tmp_path, cells)
    process, lines = started(root, jobs=2)
    output = "".join(read_rest(lines))
    assert process.wait(timeout=60) == 1, output
    log = root / ".vaebench/repro/ae-diverges-s0.log"
    assert "stage train@ae-diverges-s0 failed" in output and ".vaebench/repro/ae-diverges-s0.log" in output
    assert "NaN or infinite" in log.read_text()
    assert "ae-linear-z2-s0: done" in output  # the other job finished the stage it was running
    assert not (root / "results/tiny/train").exists()
    assert cell_runs(root) == {"ae-diverges-s0": "FAILED", "ae-linear-z2-s0": "FINISHED"}

    # the cause fixed, a re-run restores the finished cell from the run-cache and trains only the other
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["cells"]["ae-diverges-s0"]["lr"] = 0.001
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    process, lines = started(root, jobs=2)
    output = "".join(read_rest(lines))
    assert process.wait(timeout=60) == 0, output
    assert "Stage 'train@ae-linear-z2-s0' is cached - skipping run" in output
    assert "Running stage 'train@ae-linear-z2-s0'" not in output
    assert "[ae-diverges-s0] Running stage 'train@ae-diverges-s0'" in output
    assert (root / "results/tiny/train/ae-linear-z2-s0/model.pt").is_file()


def test_only_the_stale_stages_whose_outputs_the_cache_lacks_are_left_to_the_run_cache(tmp_path):
    cache = tmp_path / "cache"
    (cache / "files/md5/aa").mkdir(parents=True)
    (cache / "files/md5/aa/11111111111111111111111111111111").write_text("an output DVC cached")
    entry = "    cmd: python -m pipeline {}\n    outs:\n    - path: out\n      md5: {}\n"
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        "schema: '2.0'\nstages:\n"
        + "  train@cached:\n"
        + entry.format("a", "aa11111111111111111111111111111111")
        + "  train@uncached:\n"
        + entry.format("b", "bb22222222222222222222222222222222")
        + "  train@current:\n"
        + entry.format("c", "cc33333333333333333333333333333333")
    )
    forget_uncached(lock, {"train@cached", "train@uncached"}, str(cache))
    stages = yaml.safe_load(lock.read_text())["stages"]
    # checked out from its entry / looked up in the run-cache / not stale, left as it is
    assert sorted(stages) == ["train@cached", "train@current"]
    assert stages["train@cached"]["outs"][0]["md5"] == "aa11111111111111111111111111111111"
