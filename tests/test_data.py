import dataclasses
import gzip
import shutil

import numpy as np
import pytest

from conftest import SHARED_DATA
from pipeline import data
from pipeline.paths import PREPARED_DIR, PREPARED_FILE
from pipeline.prepare import prepare


def with_data(config, **changes):
    return dataclasses.replace(config, data=dataclasses.replace(config.data, **changes))


def copy_raw(target):
    (target / "MNIST" / "raw").mkdir(parents=True)
    for name in data.MNIST_SHA256:
        shutil.copyfile(data.raw_dir(SHARED_DATA) / name, target / "MNIST" / "raw" / name)


def test_read_idx_gives_the_published_shapes():
    raw = data.load_raw(SHARED_DATA)
    assert raw["train_images"].shape == (60_000, 28, 28) and raw["train_images"].dtype == np.uint8
    assert raw["test_images"].shape == (10_000, 28, 28)
    assert raw["train_labels"].shape == (60_000,) and set(np.unique(raw["test_labels"])) == set(range(10))
    # The first training label of MNIST is a 5 and the first test label a 7.
    assert raw["train_labels"][0] == 5 and raw["test_labels"][0] == 7


def test_split_is_deterministic_and_disjoint():
    raw = data.load_raw(SHARED_DATA)
    first = data.split(raw, 55_000, 5_000, 10_000, seed=0)
    again = data.split(raw, 55_000, 5_000, 10_000, seed=0)
    other = data.split(raw, 55_000, 5_000, 10_000, seed=1)
    assert all(np.array_equal(first[key], again[key]) for key in first)
    assert not np.array_equal(first["val_images"], other["val_images"])
    train = {img.tobytes() for img in first["train_images"]}
    # MNIST has a handful of byte-identical duplicate images, so allow a few collisions.
    assert sum(img.tobytes() in train for img in first["val_images"]) < 10
    assert len(first["train_images"]) + len(first["val_images"]) == 60_000
    # Exactly disjoint, and every image with its own label: split the positions 0..59999 themselves.
    positions = {
        "train_images": np.arange(60_000),
        "train_labels": np.arange(60_000),
        "test_images": np.arange(10_000),
        "test_labels": np.arange(10_000),
    }
    parts = data.split(positions, 55_000, 5_000, 10_000, seed=0)
    assert not set(parts["train_images"].tolist()) & set(parts["val_images"].tolist())
    assert sorted([*parts["train_images"].tolist(), *parts["val_images"].tolist()]) == list(range(60_000))
    assert np.array_equal(parts["train_labels"], parts["train_images"])
    assert np.array_equal(parts["val_labels"], parts["val_images"])
    assert np.array_equal(parts["test_images"], np.arange(10_000))


def test_prepare_writes_uint8_splits(prepared):
    arrays = data.load_prepared(PREPARED_FILE)
    assert arrays["train_images"].dtype == np.uint8
    assert [len(arrays[f"{s}_images"]) for s in data.SPLITS] == [500, 100, 200]


def test_corrupt_file_fails_with_the_file_named_and_no_output(tiny_study, workdir):
    root = workdir / "copy"
    copy_raw(root)
    victim = data.raw_dir(root) / "t10k-labels-idx1-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:-100])  # truncated
    config = with_data(tiny_study, root=str(root))
    with pytest.raises(data.DataError, match=r"checksum mismatch for .*t10k-labels-idx1-ubyte\.gz"):
        prepare(config)
    assert not PREPARED_DIR.exists()


def test_missing_files_without_download_name_the_folder_and_files(tiny_study, workdir):
    root = workdir / "empty"
    config = with_data(tiny_study, root=str(root), download=False)
    with pytest.raises(data.DataError) as error:
        prepare(config)
    assert str(data.raw_dir(root)) in str(error.value) and "train-images-idx3-ubyte.gz" in str(error.value)
    assert not PREPARED_DIR.exists()


def files_in(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_failed_download_names_the_cause_and_writes_nothing_into_the_data_folder(tiny_study, workdir, monkeypatch):
    import pipeline.prepare

    root = workdir / "three-of-four"
    copy_raw(root)
    (data.raw_dir(root) / "t10k-labels-idx1-ubyte.gz").unlink()
    before = files_in(root)
    monkeypatch.setattr(pipeline.prepare, "mirrors", lambda: ["http://127.0.0.1:9/"])  # nothing listens on port 9
    with pytest.raises(data.DataError, match=r"downloading them failed \(.*Connection refused") as error:
        prepare(with_data(tiny_study, root=str(root)))
    assert str(data.raw_dir(root)) in str(error.value) and "t10k-labels-idx1-ubyte.gz" in str(error.value)
    assert files_in(root) == before  # nothing unpacked, nothing partial
    assert not PREPARED_DIR.exists()


def test_download_writes_only_the_missing_checked_file(tiny_study, workdir, monkeypatch):
    import functools
    import http.server
    import threading

    import pipeline.prepare

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(data.raw_dir(SHARED_DATA)))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # The first mirror refuses the connection; the second serves the files.
        monkeypatch.setattr(
            pipeline.prepare,
            "mirrors",
            lambda: ["http://127.0.0.1:9/", f"http://127.0.0.1:{server.server_address[1]}/"],
        )
        root = workdir / "three-of-four"
        copy_raw(root)
        (data.raw_dir(root) / "t10k-labels-idx1-ubyte.gz").unlink()
        present = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in data.raw_dir(root).iterdir()}
        prepare(with_data(tiny_study, root=str(root)))
    finally:
        server.shutdown()
    # The three files it had are the very same files, untouched; only the missing one was written.
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in present} == present
    assert files_in(root) == ["MNIST", "MNIST/raw", *sorted(f"MNIST/raw/{name}" for name in data.MNIST_SHA256)]
    data.verify_checksums(root)
    assert PREPARED_FILE.is_file()


def test_not_an_idx_file_is_reported(tmp_path):
    bogus = tmp_path / "x.gz"
    with gzip.open(bogus, "wb") as handle:
        handle.write(b"hello world, not idx")
    with pytest.raises(data.DataError, match="not an IDX file"):
        data.read_idx(bogus)


def test_a_temporary_dvc_workspace_finds_the_stores_and_a_relative_data_root_in_the_repository(
    tiny_study, workdir, monkeypatch
):
    """`dvc exp run --temp` runs a stage in a throw-away folder under .dvc/tmp/exps and names the repository
    in DVC_ROOT: the data and the stores are the repository's, the stage's outputs stay in the workspace."""
    from pipeline import tracking, tune

    repository = workdir / "repo"
    workspace = repository / ".dvc" / "tmp" / "exps" / "tmp1234"
    workspace.mkdir(parents=True)
    copy_raw(repository / "data")
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("DVC_ROOT", str(repository))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    prepare(with_data(tiny_study, root="data"))
    assert (workspace / PREPARED_FILE).is_file()
    assert tracking.tracking_uri() == f"sqlite:///{repository / 'mlflow.db'}"
    assert tracking.artifact_root() == repository / "mlartifacts"
    assert tune.storage_url() == f"sqlite:///{repository / 'optuna.db'}"
