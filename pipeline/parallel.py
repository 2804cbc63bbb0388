"""`vaebench repro --jobs N`: a study's independent stages N at a time on one machine, on DVC's own machinery.

The stages every cell needs (prepare, classifier) run first, in this workspace. Then each cell's stages (its
train and evaluate stages, with those of the cells fine-tuned from it) and the floor stage are one piece of
work; N workers each take the next piece and run `dvc repro` of its stages in a workspace of their own under
.dvc/tmp/, a copy of this working tree that shares this repository's DVC cache, and so its run-cache. DVC
orders the stages of a piece and saves each finished stage in the run-cache; last, `dvc repro` here finds
every stage there, checks their outputs out into this workspace without running them, and runs what is left
(the report). Runs are logged to this repository's MLflow store (or MLFLOW_TRACKING_URI), under the study's
parent run, as they would be without --jobs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from pipeline import tracking
from pipeline.config import DATA_ROOT_ENV, ConfigError, StudyConfig
from pipeline.errors import VaebenchError
from pipeline.outputs import write_text
from pipeline.paths import RESUME_DIR
from pipeline.shards import dvc as run_dvc_here
from pipeline.shards import dvc_command, shard_stages

log = logging.getLogger(__name__)

WORKSPACES = Path(".dvc") / "tmp" / "vaebench-jobs"  # ignored by Git and by DVC's stage collection
LOGS = Path(".vaebench") / "repro"  # each piece's `dvc repro` output
UPSTREAM_STAGE = "classifier"  # with prepare, before it: the stages every cell's train stage depends on
KEPT_IN_WORKSPACE = {".dvc", "results", ".vaebench"}  # a workspace's own state, not copied from here
FAILED_STAGE = re.compile(r"failed to reproduce '([^']+)'")
CONV_COST = 4  # a conv epoch costs about four linear ones (docs/speed.md): only the order of the pieces


@dataclasses.dataclass(frozen=True)
class Piece:
    """Stages one worker reproduces together, in one `dvc repro`."""

    name: str
    stages: tuple[str, ...]
    cost: float  # a rough estimate, for handing out the longest pieces first


def pieces(config: StudyConfig) -> list[Piece]:
    """The floor stage, and each cell of `cells:` with the cells fine-tuned from it, longest first."""
    found = [Piece("floor", ("floor",), 0.0)]
    for name, cell in config.cells.items():
        if cell.init_from:
            continue
        group = [name] + [other.name for other in config.cells.values() if other.init_from == name]
        cost = sum(
            config.cells[member].epochs * (CONV_COST if config.cells[member].arch == "conv" else 1) for member in group
        )
        found.append(Piece(name, tuple(shard_stages(config, group)), float(cost)))
    return sorted(found, key=lambda piece: -piece.cost)


def machine_cores() -> int:
    return len(os.sched_getaffinity(0))


def default_jobs(threads: int, cores: int) -> int:
    """As many jobs as the cores hold at the study's threads each. More only share the cores: on 2 cores the
    default study took 15 min 3 s with 2 jobs of 2 threads, no less than with 1 (docs/speed.md#parallel-stages)."""
    return max(1, cores // threads)


def check_jobs(jobs: int, cores: int) -> None:
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if jobs > 2 * cores:
        raise ConfigError(
            f"--jobs {jobs} on {cores} cores: at most {2 * cores} (twice the cores); more jobs than that only "
            f"share the same cores, each slower; leave --jobs out for cores / threads"
        )


def busy_threads_sleep(jobs: int, threads: int, cores: int) -> dict[str, str]:
    """The environment that makes a job's waiting threads sleep when the jobs' threads outnumber the cores.
    PyTorch's OpenMP threads otherwise spin while they wait, taking the core from the other job's threads
    (benchmarks/jobs.py: 2 jobs of 2 threads on 2 cores train conv epochs 2.8 times slower spinning). The
    numbers do not change: the same threads split the same work."""
    return {"OMP_WAIT_POLICY": "PASSIVE"} if jobs * threads > cores else {}


def changed_stages(stages: list[str]) -> set[str]:
    """The stages among `stages` that `dvc status` finds out of date here."""
    import json

    result = subprocess.run(dvc_command("status", "--json", *stages), capture_output=True, text=True)
    if result.returncode != 0:
        raise VaebenchError(f"`dvc status` failed: {result.stderr.strip() or result.stdout.strip()}")
    return {name.split(":")[-1] for name in json.loads(result.stdout or "{}")}


def forget_uncached(lock_file: Path, stages: set[str], cache: str) -> None:
    """Drop from a dvc.lock the entries of these stages whose outputs are not all in the DVC cache, so that
    `dvc repro` looks each such stage up in the run-cache by its deps and params. While an entry's deps and
    params match, DVC only checks out that entry's outputs and, when the cache lacks them (a fresh clone's
    committed dvc.lock), runs the stage again without consulting the run-cache, where the job's result is."""
    from ruamel.yaml import YAML

    if not lock_file.is_file():
        return
    yaml = YAML()
    document = yaml.load(lock_file.read_text())
    entries = document.get("stages") or {}
    for stage in stages & set(entries):
        hashes = [out.get("md5", "") for out in entries[stage].get("outs", [])]
        if not all(len(md5) > 2 and (Path(cache) / "files" / "md5" / md5[:2] / md5[2:]).exists() for md5 in hashes):
            del entries[stage]
    text = io.StringIO()
    yaml.dump(document, text)
    write_text(lock_file, text.getvalue())


def working_tree_files(root: Path) -> list[str]:
    """The files of this working tree as Git sees them: tracked ones (as edited) and untracked ones it does
    not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if listed.returncode != 0:
        raise VaebenchError(f"--jobs copies the Git working tree, and `git ls-files` failed: {listed.stderr.strip()}")
    return [name for name in listed.stdout.split("\0") if name and (root / name).is_file()]


def sync_workspace(root: Path, workspace: Path, files: list[str], cache_dir: str, stale: set[str]) -> None:
    """Make `workspace` a copy of this working tree's files whose DVC cache is this repository's, and whose
    dvc.lock leaves the `stale` stages whose outputs the cache lacks to the run-cache (a stage a job finished
    earlier is restored, not run again). Its results/ and DVC state are its own; its resume checkpoints are
    this repository's (a killed job resumes from here)."""
    from configobj import ConfigObj

    keep = set(files)
    if workspace.is_dir():
        for path in sorted(workspace.rglob("*"), reverse=True):
            relative = path.relative_to(workspace)
            if relative.parts[0] in KEPT_IN_WORKSPACE or path.is_dir() and not path.is_symlink():
                continue
            if relative.as_posix() not in keep:
                path.unlink()
    for name in files:
        source, target = root / name, workspace / name
        if target.is_file():
            copied, original = target.stat(), source.stat()
            if (copied.st_size, copied.st_mtime_ns) == (original.st_size, original.st_mtime_ns):
                continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    forget_uncached(workspace / "dvc.lock", stale, cache_dir)
    config = ConfigObj(str(root / ".dvc" / "config.local"))  # empty when the file is missing
    (workspace / ".dvc").mkdir(parents=True, exist_ok=True)
    config.filename = str(workspace / ".dvc" / "config.local")
    config.setdefault("cache", {})["dir"] = cache_dir
    config.setdefault("core", {})["no_scm"] = "true"  # the workspace is no Git repository
    config.write()
    resume, shared = workspace / RESUME_DIR, (root / RESUME_DIR).resolve()
    shared.mkdir(parents=True, exist_ok=True)
    if not resume.is_symlink() or Path(os.readlink(resume)) != shared:
        resume.parent.mkdir(parents=True, exist_ok=True)
        if resume.is_symlink():
            resume.unlink()
        shutil.rmtree(resume, ignore_errors=True)
        resume.symlink_to(shared, target_is_directory=True)


def cache_dir() -> str:
    result = subprocess.run(dvc_command("cache", "dir"), capture_output=True, text=True)
    if result.returncode != 0:
        raise VaebenchError(f"`dvc cache dir` failed: {result.stderr.strip()}; run vaebench repro in the repository")
    return str(Path(result.stdout.strip()).resolve())


def worker_env(config: StudyConfig, root: Path, jobs: int) -> dict[str, str]:
    env = {**busy_threads_sleep(jobs, config.threads, machine_cores()), **os.environ, "DVC_NO_ANALYTICS": "1"}
    env.setdefault("MLFLOW_TRACKING_URI", tracking.tracking_uri())  # this repository's store, not the workspace's
    env[DATA_ROOT_ENV] = str((root / (os.environ.get(DATA_ROOT_ENV) or config.data.root)).resolve())
    env.pop("DVC_ROOT", None)
    return env


@dataclasses.dataclass
class Outcome:
    piece: Piece
    returncode: int
    log_file: Path

    def what_failed(self) -> str:
        found = FAILED_STAGE.findall(self.log_file.read_text(errors="replace"))
        return f"stage {found[-1]}" if found else f"`dvc repro` of {self.piece.name}"


class Workers:
    """N threads, each running one `dvc repro` at a time in its own workspace; stop() ends them all."""

    def __init__(self, root: Path, workspaces: list[Path], env: dict[str, str]):
        self.root, self.workspaces, self.env = root, workspaces, env
        self.todo: queue.Queue[Piece] = queue.Queue()
        self.total = 0
        self.outcomes: list[Outcome] = []
        self.processes: dict[int, subprocess.Popen] = {}
        self.lock = threading.Lock()  # guards processes, outcomes and the decision to start a piece
        self.stopping = threading.Event()  # no new piece starts
        self.interrupted = False

    def run(self, work: list[Piece]) -> list[Outcome]:
        self.total = len(work)
        for piece in work:
            self.todo.put(piece)
        threads = [
            threading.Thread(target=self._work, args=(index,), daemon=True) for index in range(len(self.workspaces))
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.2)
        except BaseException:  # Ctrl-C, SIGTERM: every job's stage ends its run KILLED before we go
            self.stop()
            for thread in threads:
                thread.join()
            raise
        return self.outcomes

    def stop(self) -> None:
        """SIGTERM to every job's process group at once (its stage ends its MLflow run KILLED and keeps
        nothing half-written), SIGKILL to what is left after STOP_SECONDS."""
        from pipeline.server import STOP_SECONDS

        with self.lock:
            self.stopping.set()
            self.interrupted = True
            groups = [process.pid for process in self.processes.values()]
        for group in groups:
            signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        while groups and time.monotonic() < deadline:
            time.sleep(0.2)
            groups = [group for group in groups if signal_group(group, 0)]
        for group in groups:
            signal_group(group, signal.SIGKILL)

    def _work(self, index: int) -> None:
        while True:
            with self.lock:  # stop() either sees this job's process or the job starts none
                if self.stopping.is_set():
                    return
                try:
                    piece = self.todo.get_nowait()
                except queue.Empty:
                    return
                log_file = self.root / LOGS / f"{piece.name}.log"
                log_file.parent.mkdir(parents=True, exist_ok=True)
                shown = log_file.relative_to(self.root)
                say(f"[job {index + 1}] {piece.name}: dvc repro {' '.join(piece.stages)} (log: {shown})")
                process = subprocess.Popen(
                    dvc_command("repro", *piece.stages),
                    cwd=self.workspaces[index],
                    env=self.env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,  # Ctrl-C reaches only us, and stop() ends each job's group
                )
                self.processes[index] = process
            returncode = -1  # unless the job is followed to its end
            try:
                returncode = follow(process, piece, log_file)
            finally:
                if returncode == -1:  # this thread failed (a full disk for the log): end the job, not leave it
                    signal_group(process.pid, signal.SIGKILL)
                    process.wait()
                with self.lock:
                    del self.processes[index]
                    self.outcomes.append(Outcome(piece, returncode, log_file))
                    done = len(self.outcomes)
                    if returncode != 0:
                        self.stopping.set()  # the other jobs finish the piece they are running, then stop
            if returncode == 0:
                state = "done"
            else:
                state = "stopped" if self.interrupted else f"FAILED (exit {returncode})"
            say(f"[job {index + 1}] {piece.name}: {state}, {done} of {self.total} pieces finished")


def follow(process: subprocess.Popen, piece: Piece, log_file: Path) -> int:
    """Copy the job's output into its log and, each line prefixed with its piece, to ours; its exit status."""
    with log_file.open("w") as written:
        for line in process.stdout:
            written.write(line)
            written.flush()
            if line.strip():
                say(f"[{piece.name}] {line.rstrip()}")
    return process.wait()


def signal_group(group: int, signum: int) -> bool:
    """Send `signum` to a process group; whether it still had a process."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        return False
    return True


def say(text: str) -> None:
    """Our output, which its reader may stop reading (a closed pipe): the jobs and their logs go on."""
    try:
        print(text, flush=True)
    except (BrokenPipeError, ValueError):
        pass


@contextlib.contextmanager
def only_run_here(root: Path):
    """One `vaebench repro --jobs` at a time in a checkout: a second would rewrite the first's workspaces."""
    lock_file = root / WORKSPACES.parent / "vaebench-jobs.lock"
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another `vaebench repro --jobs` runs in {root}; wait for it to end (or stop it with Ctrl-C)"
            ) from None
        yield


def repro_parallel(config: StudyConfig, jobs: int) -> list[str]:
    """Reproduce the study with `jobs` workers; the pieces of work that ran in them."""
    root = Path.cwd().resolve()
    check_jobs(jobs, machine_cores())
    tracking.check_store()
    tracking.ensure_study(config)  # the experiment and its parent run, before the jobs start
    if jobs == 1:
        run_dvc_here("repro")
        return []
    with only_run_here(root):
        run_dvc_here("repro", UPSTREAM_STAGE)
        work = pieces(config)
        stale = changed_stages([stage for piece in work for stage in piece.stages])
        work = [piece for piece in work if stale.intersection(piece.stages)]
        if work:
            cache = cache_dir()
            run_in_workspaces(config, root, work, jobs, stale, cache)
            forget_uncached(root / "dvc.lock", stale, cache)
        run_dvc_here("repro")  # restores every stage the jobs ran from the run-cache, then runs the rest
        shutil.rmtree(root / WORKSPACES, ignore_errors=True)  # their outputs are in the cache and here
    return [piece.name for piece in work]


def run_in_workspaces(
    config: StudyConfig, root: Path, work: list[Piece], jobs: int, stale: set[str], cache: str
) -> None:
    files = working_tree_files(root)
    workspaces = [root / WORKSPACES / str(index) for index in range(min(jobs, len(work)))]
    for workspace in workspaces:
        sync_workspace(root, workspace, files, cache, stale)
    log.info("%d piece(s) of work on %d job(s): %s", len(work), len(workspaces), ", ".join(p.name for p in work))
    outcomes = Workers(root, workspaces, worker_env(config, root, jobs)).run(work)
    failed = [outcome for outcome in outcomes if outcome.returncode != 0]
    if failed:
        done = sum(1 for outcome in outcomes if outcome.returncode == 0)
        first = failed[0]
        raise VaebenchError(
            f"{first.what_failed()} failed (exit {first.returncode}; its output: "
            f"{first.log_file.relative_to(root)}); nothing was restored here. The {done} piece(s) that finished "
            "are in DVC's run-cache: fix the cause and re-run, and they are restored, not run again"
        )
