"""A study and a tuning study on several "machines": separate clones that share only a real PostgreSQL, an
MLflow tracking server started with `vaebench server` and a DVC remote folder."""

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml
from mlflow import MlflowClient

from conftest import REPO, SHARED_DATA, TINY_STUDY, copy_repo
from pipeline.server import alive, free_port

SHARD_CELLS = {0: ["linear-z2-b1-s0"], 1: ["ae-linear-z2-s0"]}
TRAIN_STAGES = ["train@linear-z2-b1-s0", "train@ae-linear-z2-s0"]
EVALUATE_STAGES = ["evaluate@linear-z2-b1-s0", "evaluate@ae-linear-z2-s0"]


def environment(**extra):
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("MLFLOW_TRACKING_URI", "VAEBENCH_OPTUNA_STORAGE")
    }
    return {
        **env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "VAEBENCH_DATA_ROOT": str(SHARED_DATA),
        "DVC_NO_ANALYTICS": "1",
        **extra,
    }


def run(folder, *command, **extra):
    result = subprocess.run(command, cwd=folder, env=environment(**extra), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """`vaebench server start --auth` on the test cluster's database, on a free loopback port; stopped at the
    end."""
    folder = tmp_path_factory.mktemp("server")
    database = postgres.create_database("mlflow_multi_machine")
    port = free_port()
    output = run(
        folder,
        sys.executable,
        "-m",
        "pipeline",
        "server",
        "start",
        "--postgres",
        database,
        "--port",
        str(port),
        "--artifacts",
        str(folder / "artifacts"),
        "--auth",  # the stages, shards and tuning workers below log in
    )
    assert f"http://127.0.0.1:{port}" in output
    # Every client of this module (the test process, and through environment() the stages, shards and tuning
    # workers it starts) logs in with the admin's login.
    text = (folder / ".vaebench/server/credentials").read_text()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in re.findall(r"^export (MLFLOW_TRACKING_\w+)=(\S+)$", text, re.M):
            patch.setenv(name, value)
        yield f"http://127.0.0.1:{port}"
    state = yaml.safe_load((folder / ".vaebench/server/state.json").read_text())
    run(folder, sys.executable, "-m", "pipeline", "server", "stop")
    with pytest.raises(ProcessLookupError):
        os.killpg(state["mlflow_pid"], 0)  # the server and its workers are gone


def mini_study(folder: Path) -> Path:
    """The tiny study cut to two cells (where fine-tuned cells go is checked on the tiny study below)."""
    study = yaml.safe_load(TINY_STUDY.read_text())
    study["study"] = "mini"
    study["cells"] = {name: study["cells"][name] for name in ("linear-z2-b1-s0", "ae-linear-z2-s0")}
    study["finetuned"] = {}
    path = folder / "mini.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.system
def test_a_study_sharded_over_two_clones_is_restored_whole_by_a_third(tmp_path, server):
    remote = tmp_path / "dvc-remote"
    remote.mkdir()
    params = mini_study(tmp_path)
    clones = [copy_repo(tmp_path / f"machine-{i}", params) for i in range(3)]
    for clone in clones:
        run(clone, "dvc", "remote", "add", "-d", "shared", str(remote))
    logs = [clone / "shard.log" for clone in clones[:2]]
    shards = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline", "repro", "--shard", f"{i}/2"],
            cwd=clones[i],
            env=environment(MLFLOW_TRACKING_URI=server),
            stdout=logs[i].open("w"),
            stderr=subprocess.STDOUT,
        )
        for i in (0, 1)
    ]
    codes = [shard.wait(timeout=900) for shard in shards]
    assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]
    for index, cells in SHARD_CELLS.items():  # each machine trained its share and nothing else
        trained = sorted(p.name for p in (clones[index] / "results/mini/train").iterdir())
        assert trained == sorted(cells)

    reproduced = run(clones[2], "dvc", "repro", "--pull", MLFLOW_TRACKING_URI=server)
    for stage in [*TRAIN_STAGES, *EVALUATE_STAGES, "prepare", "classifier"]:
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in reproduced, reproduced
    assert "Running stage 'report'" in reproduced
    assert "Running stage 'train" not in reproduced and "Running stage 'finetune" not in reproduced
    assert "Data and pipelines are up to date" in run(clones[2], "dvc", "status")
    assert (clones[2] / "reports/mini/report.md").is_file()

    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("vaebench-mini")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("vaebench.role") == "study"]
    cells = [r for r in runs if r.data.tags.get("vaebench.role") == "cell"]
    assert len(parents) == 1
    assert sorted(r.data.tags["vaebench.cell"] for r in cells) == sorted(
        c for share in SHARD_CELLS.values() for c in share
    )
    assert {r.data.tags["mlflow.parentRunId"] for r in cells} == {parents[0].info.run_id}
    assert {r.info.status for r in cells} == {"FINISHED"}
    assert all("test_fid_mnist_cnn" in r.data.metrics for r in cells)  # evaluated on its shard's machine
    assert "report/report.md" in [f.path for f in client.list_artifacts(parents[0].info.run_id, "report")]
    print(
        f"\ncells trained per machine {dict((i, len(c)) for i, c in SHARD_CELLS.items())}, 0 on the third; "
        f"runs per status {dict((s, [r.info.status for r in runs].count(s)) for s in {r.info.status for r in runs})}"
    )


def tuning_space(clone: Path) -> Path:
    space = yaml.safe_load((REPO / "studies/tune/tiny.yaml").read_text())
    space.update(n_trials=6, pruner={"name": "none"}, heartbeat={"interval": 1, "grace": 3}, fixed={"epochs": 10})
    path = clone / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.mark.slow
@pytest.mark.system
def test_two_tuning_workers_on_two_clones_share_postgres_and_survive_a_killed_one(tmp_path, server, postgres):
    from pipeline.tune import study_name
    from pipeline.tuning.search_space import load_space

    storage = postgres.create_database("optuna_two_workers")
    clones = [copy_repo(tmp_path / f"machine-{i}", TINY_STUDY) for i in range(3)]
    spaces = [tuning_space(clone) for clone in clones]
    for clone in clones[:2]:
        run(clone, sys.executable, "-m", "pipeline", "prepare")
    env = environment(MLFLOW_TRACKING_URI=server, VAEBENCH_OPTUNA_STORAGE=storage)
    logs = [clone / "tune.log" for clone in clones[:2]]  # files, not pipes: a full pipe would stall a worker
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline", "tune", str(spaces[i])],
            cwd=clones[i],
            env=env,
            stdout=logs[i].open("w"),
            stderr=subprocess.STDOUT,
        )
        for i in (0, 1)
    ]
    name = study_name(load_space(spaces[0]))
    victim = f":{workers[1].pid}"
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and workers[1].poll() is None and time.monotonic() < deadline:
        # A storage per look, without a pool: pooled connections of the discarded engines outlive them until
        # garbage collection, and hundreds of looks exhausted the server's 100 connections.
        polling = optuna.storages.RDBStorage(storage, engine_kwargs={"poolclass": sqlalchemy.pool.NullPool})
        try:
            trials = optuna.load_study(study_name=name, storage=polling).get_trials(deepcopy=False)
        except KeyError:  # not created yet
            trials = []
        others_done = any(t.state.is_finished() and not t.user_attrs.get("worker", "").endswith(victim) for t in trials)
        mid_trial = [
            t
            for t in trials
            if t.state == optuna.trial.TrialState.RUNNING
            and 1 <= len(t.intermediate_values) <= 8
            and t.user_attrs.get("worker", "").endswith(victim)
        ]
        if others_done and mid_trial:
            killed = mid_trial[0].number
            workers[1].send_signal(signal.SIGKILL)
        time.sleep(0.05)
    workers[1].wait()
    workers[0].wait(timeout=600)
    assert killed is not None, f"worker 1 was never caught mid-trial: {logs[1].read_text()[-3000:]}"
    assert workers[0].returncode == 0, logs[0].read_text()[-3000:]

    trials = {t.number: t for t in optuna.load_study(study_name=name, storage=storage).get_trials()}
    states = [t.state.name for t in trials.values()]
    assert trials[killed].state == optuna.trial.TrialState.FAIL
    retried = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed]
    assert len(retried) == 1 and retried[0].state == optuna.trial.TrialState.COMPLETE
    assert retried[0].params == trials[killed].params
    assert "RUNNING" not in states and "WAITING" not in states
    # n_trials counted trials; the retry of the killed one and one concurrent start may add one each
    assert 6 <= states.count("COMPLETE") <= 6 + 1 + 1, states
    per_worker = [t.user_attrs["worker"] for t in trials.values()]
    assert len(set(per_worker)) == 2, per_worker  # both machines ran trials

    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("vaebench-tiny")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`vaebench.role` = 'trial'")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    killed_run = [r for r in runs if r.data.tags["optuna.trial"] == str(killed)]
    assert [r.info.status for r in killed_run] == ["FAILED"]
    parent = client.search_runs([experiment.experiment_id], filter_string="tags.`vaebench.role` = 'tune'")
    assert len(parent) == 1
    best_run = parent[0].data.tags["vaebench.best_run"]

    loaded = run(
        clones[2],
        sys.executable,
        "-c",
        "import sys, torch; from pipeline.tracking import load_logged_model; "
        "model = load_logged_model(sys.argv[1]); "
        "print('decoded', tuple(model.decode(torch.zeros(1, model.latent_dim)).shape))",
        best_run,
        MLFLOW_TRACKING_URI=server,
    )
    assert "decoded (1, 1, 28, 28)" in loaded
    print(
        f"\ntrials per state {dict((s, states.count(s)) for s in set(states))}; killed trial {killed}, retried as "
        f"{retried[0].number}; trials per worker {dict((w, per_worker.count(w)) for w in set(per_worker))}; "
        f"trial runs per status {Counter(r.info.status for r in runs)}"
    )


@pytest.mark.slow
@pytest.mark.system
def test_server_with_a_private_cluster_starts_logs_and_stops_what_it_started(tmp_path):
    """`vaebench server start` without --postgres: initdb/pg_ctl under .vaebench/server/postgres."""
    import tempfile
    import urllib.request

    # A folder the postgres user can reach (pytest's temporary folders are private to root).
    checkout = Path(tempfile.mkdtemp(prefix="vaebench-server-"))
    checkout.chmod(0o755)
    try:
        port = free_port()
        started = run(checkout, sys.executable, "-m", "pipeline", "server", "start", "--port", str(port))
        assert "a private PostgreSQL cluster in" in started and f"http://127.0.0.1:{port}" in started
        state = yaml.safe_load((checkout / ".vaebench/server/state.json").read_text())
        assert (
            state["backend_store"].startswith("postgresql://")
            and (checkout / ".vaebench/server/postgres/PG_VERSION").is_file()
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
            assert answer.status == 200
        client = MlflowClient(f"http://127.0.0.1:{port}")
        run_id = client.create_run(client.create_experiment("check")).info.run_id
        client.log_metric(run_id, "x", 1.5)
        client.log_text(run_id, "through the server", "note.txt")  # artifacts are served by the server
        assert client.get_run(run_id).data.metrics["x"] == 1.5
        assert list((checkout / ".vaebench/server/artifacts").rglob("note.txt"))
        assert "running at" in run(checkout, sys.executable, "-m", "pipeline", "server", "status")
        refused = subprocess.run(
            [sys.executable, "-m", "pipeline", "server", "start", "--port", str(port)],
            cwd=checkout,
            env=environment(),
            capture_output=True,
            text=True,
        )
        assert refused.returncode == 1 and "already runs at" in refused.stderr
        assert "stopped the server" in run(checkout, sys.executable, "-m", "pipeline", "server", "stop")
        with pytest.raises(ProcessLookupError):
            os.killpg(state["mlflow_pid"], 0)
        assert not alive(state["postgres_pid"])
        assert "not running" in run(checkout, sys.executable, "-m", "pipeline", "server", "status")
    finally:
        run(checkout, sys.executable, "-m", "pipeline", "server", "stop")
        subprocess.run(["rm", "-rf", str(checkout)])


def test_optuna_dashboard_serves_the_tuning_storage_on_loopback(tmp_path):
    import urllib.request

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="seen-by-the-dashboard", storage=storage)
    port = free_port()
    dashboard = subprocess.Popen(
        [str(Path(sys.executable).parent / "optuna-dashboard"), storage, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as answer:
                    body = answer.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline and dashboard.poll() is None, "optuna-dashboard did not answer"
                time.sleep(0.3)
        assert "seen-by-the-dashboard" in body
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=20)


@pytest.mark.parametrize(
    "shard, environ, expected",
    [
        ("1/3", {}, (1, 3)),
        (None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "2"}, (3, 4)),
        (None, {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"}, (0, 2)),
        (
            None,
            {
                "SLURM_ARRAY_TASK_ID": "6",
                "SLURM_ARRAY_TASK_COUNT": "4",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_STEP": "2",
            },
            (3, 4),
        ),
    ],
)
def test_the_share_comes_from_the_command_line_or_a_slurm_array(shard, environ, expected):
    from pipeline.shards import parse_shard

    assert parse_shard(shard, environ) == expected


@pytest.mark.parametrize(
    "shard, environ, message",
    [
        ("3/3", {}, "--shard must be I/N with 0 <= I < N, got '3/3'"),
        ("a/b", {}, "--shard must be I/N"),
        (None, {}, "say which share to run: --shard I/N"),
        (
            None,
            {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_STEP": "2"},
            "the Slurm array task 3 is not one of 4 evenly spaced tasks",
        ),
    ],
)
def test_a_bad_share_is_one_clear_error(shard, environ, message):
    from pipeline.config import ConfigError
    from pipeline.shards import parse_shard

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_shard(shard, environ)


def test_shares_hold_every_cell_once_with_fine_tuned_cells_beside_their_source(tiny_study):
    from pipeline.shards import shard_cells

    for count in (1, 2, 3, 9):
        shares = [shard_cells(tiny_study, index, count) for index in range(count)]
        assert sorted(c for share in shares for c in share) == sorted(tiny_study.cells)
        holder = [i for i, share in enumerate(shares) if "linear-z2-b1-s0" in share]
        assert [i for i, share in enumerate(shares) if "gan-linear-z2-ft-s0" in share] == holder


def test_a_shard_refuses_to_start_without_a_tracking_server_or_a_remote(tmp_path):
    clone = copy_repo(tmp_path / "clone", mini_study(tmp_path))
    command = [sys.executable, "-m", "pipeline", "repro", "--shard", "0/2"]
    local = subprocess.run(command, cwd=clone, env=environment(), capture_output=True, text=True)
    assert local.returncode == 2 and "must log to one tracking server: set MLFLOW_TRACKING_URI" in local.stderr
    no_remote = subprocess.run(
        command, cwd=clone, env=environment(MLFLOW_TRACKING_URI="http://127.0.0.1:9"), capture_output=True, text=True
    )
    assert no_remote.returncode == 2 and "dvc remote add -d shared" in no_remote.stderr
    assert not (clone / "results").exists() and not (clone / "mlflow.db").exists()


def test_an_unreachable_optuna_storage_is_one_line_before_any_run(tmp_path):
    from pipeline.errors import TrackingError
    from pipeline.tune import open_storage
    from pipeline.tuning.search_space import load_space

    space = load_space(REPO / "studies/tune/tiny.yaml")
    with pytest.raises(
        TrackingError, match=r"the Optuna storage postgresql://nobody@127.0.0.1:9/optuna cannot be opened"
    ):
        open_storage(f"postgresql://nobody@127.0.0.1:{9}/optuna", space)
