from pathlib import Path

import pytest

from pipeline.config import load_study

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TINY_STUDY = REPO / "studies" / "tiny.yaml"


STORE_VARIABLES = ("MLFLOW_TRACKING_URI", "VAEBENCH_OPTUNA_STORAGE", "VAEBENCH_DATA_ROOT")


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
    """Each test logs to an MLflow store in its own folder."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory (the fixtures above give it the real MNIST files and a private MLflow store)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_study(workdir):
    return load_study(TINY_STUDY)


@pytest.fixture
def prepared(tiny_study):
    from pipeline.prepare import prepare

    prepare(tiny_study)
    return tiny_study
