"""Faults a user meets (issue 11): each ends in one clear line, leaves nothing half-written or RUNNING,
and no file the pipeline reads can run code."""

import dataclasses
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from conftest import TINY_STUDY
from pipeline import cli, tracking
from pipeline.config import load_study, parse_study
from pipeline.errors import ArtifactError, TrackingError, VaebenchError
from pipeline.evaluate import evaluate_cell
from pipeline.outputs import load_torch_file, read_json
from pipeline.paths import MODEL_FILE, RUN_FILE, evaluate_dir, resume_file, train_dir
from pipeline.prepare import prepare
from pipeline.reporting.results import seed_groups
from pipeline.train import train_cell
from test_train import CELL, interrupt, with_cell

AE = "ae-linear-z2-s0"


def one_cell_study(folder, epochs: int):
    """The tiny study reduced to CELL trained for `epochs` epochs, as a params file."""
    raw = yaml.safe_load(TINY_STUDY.read_text())
    raw["cells"] = {CELL: {**raw["cells"][CELL], "epochs": epochs}}
    raw["finetuned"] = {}
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def vaebench(*args, cwd, env=None, **options):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
        **options,
    )


def one_error_line(result, code=1):
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("vaebench")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def store() -> MlflowClient:
    """The test's own store (MlflowClient() alone would follow the URI an earlier test set in-process)."""
    return MlflowClient(tracking.tracking_uri())


def runs_of(study, cell):
    client = store()
    experiment = client.get_experiment_by_name(tracking.experiment_name(study))
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`vaebench.cell` = '{cell}'")


# 1. Nothing the pipeline loads can run code.


def test_loading_a_crafted_pickle_runs_no_code_and_names_the_file(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    crafted = tmp_path / "model.pt"
    torch.save({"state_dict": Payload()}, crafted)
    with pytest.raises(ArtifactError, match=rf"{crafted} is not a readable PyTorch file .*dvc repro -f train@x"):
        load_torch_file(crafted, "train@x")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty"])
def test_a_damaged_file_is_named_with_the_stage_that_rewrites_it(tmp_path, damage):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(100)}, path)
    content = {"truncated": path.read_bytes()[:200], "random bytes": os.urandom(4000), "empty": b""}[damage]
    path.write_bytes(content)
    with pytest.raises(ArtifactError, match=rf"{path} is not a readable PyTorch file .*dvc repro -f classifier"):
        load_torch_file(path, "classifier")
    with pytest.raises(ArtifactError, match=rf"{tmp_path / 'missing.pt'} is missing; run `dvc repro classifier`"):
        load_torch_file(tmp_path / "missing.pt", "classifier")


def test_a_fine_tuned_cuda_cell_model_loads_back_on_this_machine(tiny_study, workdir):
    from pipeline.models import build_model

    cell = dataclasses.replace(tiny_study.cell("gan-linear-z2-ft-s0"), device="cuda")
    model = build_model(cell)
    with tracking.cell_run(tiny_study, cell, stage="finetune@" + cell.name) as run:
        tracking.log_model(model, cell)
    loaded = tracking.load_logged_model(run.info.run_id)
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in model.state_dict().items())


def test_the_mlflow_model_is_weights_and_cell_and_loads_back(prepared):
    train_cell(prepared, AE)
    run_id = read_json(train_dir(prepared.study, AE) / RUN_FILE)["run_id"]
    paths = sorted(a.path for a in store().list_artifacts(run_id, tracking.MODEL_ARTIFACT))
    assert paths == ["model/cell.json", "model/state_dict.pt"]
    loaded = tracking.load_logged_model(run_id)
    saved = torch.load(train_dir(prepared.study, AE) / MODEL_FILE, weights_only=True)["state_dict"]
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(loaded.state_dict()[key], saved[key]) for key in saved)


# 2. An unreachable tracking server fails at once, before any work.


def test_an_unreachable_tracking_server_is_one_line_before_any_work(tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    result = vaebench("--params", str(TINY_STUDY), "evaluate", CELL, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    line = one_error_line(result)
    assert f"the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) does not answer" in line
    assert "unset MLFLOW_TRACKING_URI" in line
    assert list(tmp_path.iterdir()) == []


def test_a_server_that_answers_with_an_error_status_is_reachable(tmp_path, monkeypatch):
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))  # /health: 404
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_address[1]}")
        tracking.check_store()
    finally:
        server.shutdown()


def test_a_tracking_server_that_never_answers_times_out(monkeypatch):
    with socket.socket() as silent:  # accepts connections (the backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(tracking, "HEALTH_TIMEOUT_SECONDS", 0.5)  # the same time-out, not 5 s of waiting
        with pytest.raises(TrackingError, match="does not answer .*timed out"):
            tracking.check_store()


# 3. The CLI prints a project error as one line; a bug keeps its traceback.


def test_the_cli_prints_project_errors_and_lets_bugs_through(monkeypatch, capsys):
    def fails(args):
        raise ArtifactError("results/x/model.pt is missing; run `dvc repro train@x` first")

    monkeypatch.setattr(cli, "cmd_check", fails)
    assert cli.main(["check"]) == 1
    assert capsys.readouterr().err == "vaebench: error: results/x/model.pt is missing; run `dvc repro train@x` first\n"

    def bug(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_check", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["check"])


def test_a_random_bytes_model_is_one_line_naming_it(prepared):
    train_cell(prepared, AE)
    model = train_dir(prepared.study, AE) / MODEL_FILE
    model.write_bytes(os.urandom(5000))
    result = vaebench("--params", str(TINY_STUDY), "evaluate", AE, cwd=Path.cwd())
    assert f"{model} is not a readable PyTorch file" in one_error_line(result)
    assert not evaluate_dir(prepared.study, AE).exists()


def test_a_resume_checkpoint_of_another_type_is_ignored(prepared, caplog):
    path = resume_file(prepared.study, CELL)
    path.parent.mkdir(parents=True)
    torch.save([1, 2, 3], path)
    assert [row["epoch"] for row in train_cell(prepared, CELL)] == [1]
    assert f"ignoring {path}: it is not a resume checkpoint" in caplog.text


def test_bench_before_prepare_says_so(tiny_study):
    from pipeline.bench import run_bench

    with pytest.raises(
        VaebenchError, match=r"prepared data results/prepare/mnist.npz is missing; run `dvc repro prepare`"
    ):
        run_bench(tiny_study, [CELL], 256, None)


# 4. No run stays RUNNING or is silently replaced; signals end runs KILLED; a closed pipe does not stop work.


def test_a_run_left_running_by_a_killed_process_ends_killed_when_the_cell_reruns(prepared):
    with pytest.raises(KeyboardInterrupt):
        train_cell(with_cell(prepared, epochs=2), CELL, on_epoch_end=interrupt)
    killed = torch.load(resume_file(prepared.study, CELL), weights_only=True)["run_id"]
    assert store().get_run(killed).info.status == "KILLED"
    store().update_run(killed, status="RUNNING")  # as a SIGKILL leaves it
    train_cell(with_cell(prepared, epochs=1), CELL)  # edited params: the checkpoint is stale, a new run starts
    statuses = {run.info.run_id: run.info.status for run in runs_of(prepared.study, CELL)}
    assert statuses[killed] == "KILLED" and len(statuses) == 2
    assert "RUNNING" not in statuses.values()


def test_evaluating_a_cell_whose_run_is_gone_fails_before_any_work(prepared):
    train_cell(prepared, AE)
    run_id = read_json(train_dir(prepared.study, AE) / RUN_FILE)["run_id"]
    store().delete_run(run_id)
    with pytest.raises(TrackingError, match=rf"the MLflow run {run_id} recorded in .* is not in the tracking store"):
        evaluate_cell(prepared, AE)
    assert not evaluate_dir(prepared.study, AE).exists()
    assert len(runs_of(prepared.study, AE)) == 0  # no new run holding only test metrics


def test_resuming_without_the_run_logs_the_earlier_epochs_to_a_new_run(prepared):
    config = with_cell(prepared, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        train_cell(config, CELL, on_epoch_end=interrupt)
    lost = torch.load(resume_file(prepared.study, CELL), weights_only=True)["run_id"]
    store().delete_run(lost)
    train_cell(config, CELL)
    run_id = read_json(train_dir(prepared.study, CELL) / RUN_FILE)["run_id"]
    assert run_id != lost
    assert [m.step for m in store().get_metric_history(run_id, "train_loss")] == [1, 2]
    assert store().get_run(run_id).data.params["cell.epochs"] == "2"


def stop_after(process, checkpoint, epochs: int, signum) -> None:
    """Send `signum` once the resume checkpoint holds `epochs` epochs (that is, mid-training)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if checkpoint.is_file() and len(torch.load(checkpoint, weights_only=True)["history"]) >= epochs:
            process.send_signal(signum)
            break
        time.sleep(0.05)
    process.wait(timeout=300)


@pytest.mark.slow
def test_sigterm_and_sigkill_mid_training_resume_to_the_uninterrupted_result(prepared):
    folder = Path.cwd()
    params = one_cell_study(folder, epochs=20)
    config = load_study(params)
    checkpoint = resume_file(config.study, CELL)
    command = [sys.executable, "-m", "pipeline", "--params", str(params), "train", CELL]

    terminated = subprocess.Popen(command, cwd=folder, stderr=subprocess.PIPE, text=True)
    stop_after(terminated, checkpoint, 1, signal.SIGTERM)
    message = terminated.stderr.read()
    assert terminated.returncode == 128 + signal.SIGTERM and "Traceback" not in message
    run_id = torch.load(checkpoint, weights_only=True)["run_id"]
    assert message.endswith(
        f"vaebench train: terminated (SIGTERM); its MLflow run {run_id} ended KILLED and nothing half-written was "
        "kept; re-run the same command (or dvc repro) to resume after the last finished epoch\n"
    )
    assert store().get_run(run_id).info.status == "KILLED"

    done = len(torch.load(checkpoint, weights_only=True)["history"])
    killed = subprocess.Popen(command, cwd=folder, stderr=subprocess.DEVNULL)
    stop_after(killed, checkpoint, done + 1, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    state = torch.load(checkpoint, weights_only=True)
    assert done < len(state["history"]) < 20 and state["run_id"] == run_id

    resumed = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {len(state['history'])}" in resumed.stderr
    reference = train_cell(dataclasses.replace(config, study="uninterrupted"), CELL)
    assert read_json(train_dir(config.study, CELL) / "history.json") == reference
    weights = torch.load(train_dir(config.study, CELL) / MODEL_FILE, weights_only=True)["state_dict"]
    expected = torch.load(train_dir("uninterrupted", CELL) / MODEL_FILE, weights_only=True)["state_dict"]
    assert weights.keys() == expected.keys() and all(torch.equal(weights[key], expected[key]) for key in expected)
    assert store().get_run(run_id).info.status == "FINISHED"
    steps = {m.step for m in store().get_metric_history(run_id, "train_loss")}
    assert steps == set(range(1, 21))
    assert [run.info.status for run in runs_of(config.study, CELL)] == ["FINISHED"]
    assert not checkpoint.exists()


def test_a_table_piped_into_head_ends_quietly(tmp_path):
    # `true` exits at once, long before the table is printed: every write meets a closed pipe.
    shell = f"'{sys.executable}' -m pipeline --params '{TINY_STUDY}' table | true; exit ${{PIPESTATUS[0]}}"
    result = subprocess.run(["bash", "-c", shell], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stderr == ""


@pytest.mark.parametrize("reader", ["head -n 1", "true"])  # reads one line, or exits before the first
def test_training_piped_into_a_reader_that_stops_finishes(prepared, reader):
    folder = Path.cwd()
    params = one_cell_study(folder, epochs=5)
    shell = f"'{sys.executable}' -m pipeline --params '{params}' train {CELL} 2>&1 | {reader}; exit ${{PIPESTATUS[0]}}"
    result = subprocess.run(["bash", "-c", shell], cwd=folder, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout
    config = load_study(params)
    assert [row["epoch"] for row in read_json(train_dir(config.study, CELL) / "history.json")] == [1, 2, 3, 4, 5]
    assert [run.info.status for run in runs_of(config.study, CELL)] == ["FINISHED"]


# 6. Wrong results: resume on changed data, seed groups, non-finite metrics.


def test_a_checkpoint_of_other_prepared_data_is_not_resumed(prepared, caplog):
    caplog.set_level(logging.INFO)
    config = with_cell(prepared, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        train_cell(config, CELL, on_epoch_end=interrupt)
    prepare(dataclasses.replace(prepared, data=dataclasses.replace(prepared.data, split_seed=1)))
    history = train_cell(config, CELL)
    assert "its input (data) changed" in caplog.text
    assert [row["epoch"] for row in history] == [1, 2]
    assert "resuming" not in caplog.text


def test_seed_groups_hold_cells_that_differ_only_in_seed():
    raw = yaml.safe_load(TINY_STUDY.read_text())
    raw["finetuned"] = {}
    raw["cells"] = {
        "vae-s0": {"family": "vae", "arch": "linear", "latent_dim": 2, "seed": 0},
        "vae-s1": {"family": "vae", "arch": "linear", "latent_dim": 2, "seed": 1},
        "vae-s2": {"family": "vae", "arch": "linear", "latent_dim": 2, "seed": 2, "lr": 0.01},  # not a seed of vae
        "other-s0": {"family": "vae", "arch": "linear", "latent_dim": 2, "seed": 3, "epochs": 2},
    }
    assert seed_groups(parse_study(raw)) == {"vae-s0": "vae", "vae-s1": "vae", "vae-s2": "vae-s2", "other-s0": "other"}


def test_a_model_with_nan_weights_is_refused_naming_the_file(prepared):
    train_cell(prepared, AE)
    path = train_dir(prepared.study, AE) / MODEL_FILE
    saved = torch.load(path, weights_only=True)
    next(iter(saved["state_dict"].values())).fill_(float("nan"))
    torch.save(saved, path)
    with pytest.raises(ArtifactError, match=rf"{path} holds NaN or infinite weights .*dvc repro -f train@{AE}"):
        evaluate_cell(prepared, AE)


def test_a_non_finite_test_metric_is_refused_and_nothing_is_written(prepared, monkeypatch):
    import pipeline.evaluate

    train_cell(prepared, AE)
    monkeypatch.setattr(pipeline.evaluate, "load_classifier", lambda device: None)
    monkeypatch.setattr(pipeline.evaluate, "load_test_features", lambda device: None)
    monkeypatch.setattr(
        pipeline.evaluate, "model_scores", lambda *args: ({"fid_mnist_cnn": float("nan")}, {"samples": [0.1] * 10})
    )
    with pytest.raises(VaebenchError, match=f"cell {AE}: test metric fid_mnist_cnn is nan"):
        evaluate_cell(prepared, AE)
    assert not evaluate_dir(prepared.study, AE).exists()
    assert [run.info.status for run in runs_of(prepared.study, AE)] == ["FINISHED"]  # the training run, untouched


# 7. A copied checkout writes only inside itself: its copied store is refused, a store of its own works.


@pytest.mark.parametrize(
    "message, retried",
    [
        ('(psycopg.errors.UniqueViolation) duplicate key value violates unique constraint "dataset_pk"', True),
        ("RESOURCE_DOES_NOT_EXIST: run abc not found", False),
    ],
)
def test_a_data_set_logged_by_another_machine_at_the_same_moment_is_linked_and_other_errors_stay(
    monkeypatch, message, retried
):
    from mlflow.exceptions import MlflowException

    calls = []

    def log_input(dataset, context):  # the server's answer to the second of two simultaneous inserts
        calls.append(context)
        if len(calls) == 1:
            raise MlflowException(f"BAD_REQUEST: {message}")

    monkeypatch.setattr(tracking.mlflow, "log_input", log_input)
    dataset = type("Dataset", (), {"name": "mnist"})()
    if retried:
        tracking.log_dataset(dataset, context="training")
        assert calls == ["training", "training"]
    else:
        with pytest.raises(MlflowException, match="not found"):
            tracking.log_dataset(dataset, context="training")
        assert calls == ["training"]


def test_a_copied_checkout_refuses_the_copied_store_and_logs_into_its_own(tiny_study, workdir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the local store mlflow.db, as a user has it
    original, copy = workdir / "original", workdir / "copy"
    original.mkdir()
    monkeypatch.chdir(original)
    cell = tiny_study.cell(CELL)
    figures = workdir / "figures"
    figures.mkdir()
    (figures / "note.txt").write_text("figures")
    with tracking.cell_run(tiny_study, cell, stage="train@" + CELL):
        tracking.log_artifacts(figures, artifact_path="first")
    shutil.copytree(original, copy)
    before = sorted(p for p in (original / "mlartifacts").rglob("*"))
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # as a new process finds it (mlflow.set_tracking_uri exports it)
    with pytest.raises(
        TrackingError,
        match=f"artifacts in {(original / 'mlartifacts').as_uri()} .*another checkout's "
        "folder.*Move this checkout's mlflow.db and mlartifacts/ aside",
    ):
        tracking.check_store()
    assert sorted(p for p in (original / "mlartifacts").rglob("*")) == before
    # The way out the message gives, in a new folder (MLflow keeps one store per URI in a process, as a new
    # process would not): the copy without the original's store starts one of its own.
    fresh = workdir / "fresh"
    shutil.copytree(original, fresh, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    monkeypatch.chdir(fresh)
    tracking.check_store()
    with tracking.cell_run(tiny_study, cell, stage="train@" + CELL) as run:
        tracking.log_artifacts(figures, artifact_path="second")
    assert sorted(p for p in (original / "mlartifacts").rglob("*")) == before
    assert run.info.artifact_uri.startswith((fresh / "mlartifacts").as_uri())
    assert [a.path for a in MlflowClient(tracking.tracking_uri()).list_artifacts(run.info.run_id)] == ["second"]


# 9. params.yaml is replaced whole, only after validation, never over unsaved edits.


def test_use_study_keeps_unsaved_edits_unless_forced(workdir, capsys):
    (workdir / "studies").mkdir()
    shutil.copyfile(TINY_STUDY, workdir / "studies" / "tiny.yaml")
    other = TINY_STUDY.read_text().replace("study: tiny", "study: other")
    (workdir / "studies" / "other.yaml").write_text(other)
    params = workdir / "params.yaml"
    assert cli.main(["use-study", "tiny"]) == 0
    params.write_text(params.read_text().replace("epochs: 1", "epochs: 2"))
    edited = params.read_text()
    assert cli.main(["use-study", "other"]) == 2
    assert "params.yaml holds edits that no study file has" in capsys.readouterr().err
    assert params.read_text() == edited
    assert cli.main(["use-study", "other", "--force"]) == 0
    assert params.read_text() == other
    assert cli.main(["use-study", "tiny"]) == 0  # written by use-study: nothing to lose


def test_enable_tune_leaves_an_invalid_params_file_untouched(workdir, capsys):
    from conftest import REPO

    params = workdir / "params.yaml"
    params.write_text(TINY_STUDY.read_text().replace("epochs: 1\n", "epochs: 0\n", 1))
    before = params.read_text()
    assert cli.main(["enable-tune", str(REPO / "studies" / "tune" / "default.yaml")]) == 2
    assert "epochs must be >= 1" in capsys.readouterr().err
    assert params.read_text() == before and sorted(p.name for p in workdir.iterdir()) == ["params.yaml"]
