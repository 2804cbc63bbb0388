from pathlib import Path

import pytest

from pipeline.config import load_study

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TINY_STUDY = REPO / "studies" / "tiny.yaml"


# What a clone of the repository needs to run the pipeline (no results, stores or environment).
REPO_FILES = ["pipeline", "studies", "dvc.yaml", ".dvc/config", ".dvcignore", ".gitignore"]


def copy_repo(root: Path, params: Path) -> Path:
    """A fresh clone of the repository's code in `root`, with `params` as its params.yaml."""
    import shutil
    import subprocess

    for name in REPO_FILES:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, target)
    shutil.copyfile(params, root / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


STORE_VARIABLES = ("MLFLOW_TRACKING_URI", "VAEBENCH_OPTUNA_STORAGE", "VAEBENCH_DATA_ROOT", "DVC_ROOT")


@pytest.fixture(scope="session", autouse=True)
def no_real_stores():
    """No test, module fixtures included, reaches a developer's tracking server, Optuna storage or data."""
    with pytest.MonkeyPatch.context() as patch:
        for name in STORE_VARIABLES:
            patch.delenv(name, raising=False)
        patch.setenv("VAEBENCH_DATA_ROOT", str(SHARED_DATA))
        yield


@pytest.fixture(autouse=True)
def private_tracking_store(tmp_path, monkeypatch):
    """Each test logs to an MLflow store in its own folder (MLflow's process-wide URI too, which an earlier
    test's mlflow.set_tracking_uri would otherwise leave pointing at that test's store)."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory (the fixtures above give it the real MNIST files and a private MLflow store)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_study(workdir):
    return load_study(TINY_STUDY)


@pytest.fixture(scope="session")
def empty_tracking_store(tmp_path_factory):
    """An MLflow SQLite store with its tables made: MLflow spends about a second of schema migrations on a new
    store, and a copy of this one opens at once."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("empty-tracking-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def prepared(tiny_study, tmp_path, empty_tracking_store):
    """The tiny study's data prepared in the working directory, for a test that trains: its private MLflow
    store (private_tracking_store) starts as a copy of the empty one rather than being made on first use."""
    import shutil

    from pipeline.prepare import prepare

    shutil.copyfile(empty_tracking_store, tmp_path / "mlflow.db")
    prepare(tiny_study)
    return tiny_study


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster (initdb/pg_ctl) on a free loopback port, stopped by PID at the end."""
    import shutil
    import tempfile

    from pipeline.server import PrivateCluster, alive, free_port

    # Not under pytest's private temporary folder: as root, the cluster runs as the postgres user.
    folder = Path(tempfile.mkdtemp(prefix="vaebench-pg-"))
    folder.chmod(0o755)
    cluster = PrivateCluster(folder / "cluster", free_port())
    cluster.start()
    pid = cluster.pid
    yield cluster
    cluster.stop()
    assert not alive(pid)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres, request):
    """A fresh database of the session's cluster, for one test."""
    import re

    return postgres.create_database(re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:60])
