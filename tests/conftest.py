from pathlib import Path

import pytest

from pipeline.config import load_study

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TINY_STUDY = REPO / "studies" / "tiny.yaml"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory with the real MNIST files and a private MLflow store."""
    monkeypatch.setenv("VAEBENCH_DATA_ROOT", str(SHARED_DATA))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
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
