"""`vaebench server start` with a login (MLflow's basic-auth app): who decides it is on, where the admin's
password lives (a 0600 file, never argv, output or logs), what an anonymous client or stage gets. A study logs through
such a server in tests/test_multi_machine.py, whose server asks for a login."""

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from conftest import TINY_STUDY, copy_repo
from pipeline import server
from pipeline.config import ConfigError
from pipeline.server import free_port
from test_multi_machine import environment

CELL = "linear-z2-b1-s0"
LOGIN_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def vaebench(folder: Path, *arguments: str, **extra: str) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGUMENTS` in `folder`, with no login of the caller's shell in its environment."""
    env = {name: value for name, value in environment(**extra).items() if name not in LOGIN_VARIABLES}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *arguments], cwd=folder, env=env, capture_output=True, text=True
    )


def start(folder: Path, *arguments: str) -> tuple[str, subprocess.CompletedProcess]:
    port = free_port()
    started = vaebench(folder, "server", "start", "--port", str(port), "--artifacts", str(folder / "art"), *arguments)
    assert started.returncode == 0, started.stdout + started.stderr
    return f"http://127.0.0.1:{port}", started


def stop(folder: Path) -> None:
    state = server_state(folder)
    stopped = vaebench(folder, "server", "stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    with pytest.raises(ProcessLookupError):
        os.killpg(state["mlflow_pid"], 0)


def server_state(folder: Path) -> dict:
    return yaml.safe_load((folder / ".vaebench/server/state.json").read_text())


def login(folder: Path) -> dict[str, str]:
    """The admin login from the server's credentials file, as environment variables."""
    text = (folder / ".vaebench/server/credentials").read_text()
    return dict(re.findall(r"^export (MLFLOW_TRACKING_\w+)=(\S+)$", text, re.M))


def refused_without_login(url: str, monkeypatch, **variables: str) -> str:
    for name in LOGIN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(MlflowException) as refused:
        MlflowClient(url).search_experiments()
    return str(refused.value)


@pytest.mark.parametrize(
    "host, flags, asked",
    [
        ("127.0.0.1", {}, False),
        ("::1", {}, False),
        ("localhost", {}, False),
        ("127.0.0.1", {"auth": True}, True),
        ("0.0.0.0", {}, True),
        ("192.168.1.20", {}, True),
        ("0.0.0.0", {"no_auth": True}, False),
    ],
)
def test_a_login_is_asked_beyond_loopback_unless_no_auth_and_on_loopback_with_auth(host, flags, asked):
    assert server.wants_auth(host, **flags) is asked


def test_auth_and_no_auth_together_are_one_clear_error():
    with pytest.raises(ConfigError, match="--auth and --no-auth"):
        server.wants_auth("0.0.0.0", auth=True, no_auth=True)


def test_the_admin_login_is_made_once_in_a_private_file_and_reused(workdir):
    (workdir / ".vaebench/server").mkdir(parents=True)
    username, password = server.admin_credentials()
    credentials = workdir / server.CREDENTIALS_FILE
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert username == "vaebench-admin" and len(password) >= 32
    assert server.admin_credentials() == (username, password)  # a later start reuses it
    # The file is a shell's: `. .vaebench/server/credentials` logs a client in.
    sourced = subprocess.run(
        ["sh", "-c", f". {credentials} && echo $MLFLOW_TRACKING_USERNAME $MLFLOW_TRACKING_PASSWORD"],
        capture_output=True,
        text=True,
    )
    assert sourced.stdout.split() == [username, password]


def test_the_auth_settings_file_is_private_and_read_back_whole_by_mlflow(workdir, monkeypatch):
    """A URL-encoded database password (%40 is @) survives configparser's interpolation."""
    from mlflow.server.auth.config import read_auth_config

    (workdir / ".vaebench/server").mkdir(parents=True)
    database = "postgresql://mlflow:p%40ss%25word@db-host:5432/mlflow"
    path = server.write_auth_config(database, "vaebench-admin", "s3cret-%-value")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    config = read_auth_config()
    assert (config.database_uri, config.admin_username, config.admin_password) == (
        database,
        "vaebench-admin",
        "s3cret-%-value",
    )
    assert config.default_permission == "EDIT"


def test_no_auth_beyond_loopback_warns_before_anything_starts(tmp_path):
    """The warning comes first: here the database is missing, so nothing starts (no open server in a test)."""
    nowhere = f"postgresql://mlflow:secret@127.0.0.1:{free_port()}/mlflow"
    started = vaebench(
        tmp_path, "server", "start", "--host", "0.0.0.0", "--port", str(free_port()), "--no-auth", "--postgres", nowhere
    )
    assert started.returncode == 1 and "cannot be reached" in started.stderr, started.stderr
    warnings = [line for line in started.stderr.splitlines() if "--no-auth" in line]
    assert len(warnings) == 1 and "can change or delete every experiment and run" in warnings[0], started.stderr


@pytest.mark.system
def test_a_server_with_auth_refuses_anonymous_clients_and_never_shows_the_password(tmp_path, postgres_url, monkeypatch):
    url, started = start(tmp_path, "--auth", "--postgres", postgres_url)
    try:
        state = server_state(tmp_path)
        credentials = tmp_path / ".vaebench/server/credentials"
        assert state["auth"] is True and state["credentials"] == str(credentials)
        assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / ".vaebench/server/auth.ini").stat().st_mode) == 0o600
        admin = login(tmp_path)
        password = admin["MLFLOW_TRACKING_PASSWORD"]
        assert f"MLFLOW_TRACKING_USERNAME={admin['MLFLOW_TRACKING_USERNAME']}" in started.stdout
        assert f"{credentials} (mode 0600)" in started.stdout

        # The password is on no command line of the server's processes, in no output, log or state.
        group = [pid for pid in os.listdir("/proc") if pid.isdigit() and _group_of(int(pid)) == state["mlflow_pid"]]
        assert len(group) >= 2  # mlflow server, uvicorn and its workers
        for pid in group:
            assert password not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        shown = [started.stdout, started.stderr, (tmp_path / ".vaebench/server/state.json").read_text()]
        shown += [log.read_text(errors="replace") for log in (tmp_path / ".vaebench/server").glob("*.log")]
        assert not [text for text in shown if password in text]
        assert "login required" in vaebench(tmp_path, "server", "status").stdout

        # Anonymous and wrong logins: HTTP 401, at once (no retries).
        assert "401" in refused_without_login(url, monkeypatch)
        assert "401" in refused_without_login(
            url, monkeypatch, MLFLOW_TRACKING_USERNAME="vaebench-admin", MLFLOW_TRACKING_PASSWORD="wrong-password"
        )

        # A stage without the login stops at once with one line, before any work.
        clone = copy_repo(tmp_path / "clone", TINY_STUDY)
        stage = vaebench(clone, "train", "--", CELL, MLFLOW_TRACKING_URI=url)
        assert stage.returncode == 1 and "Traceback" not in stage.stderr, stage.stderr
        assert stage.stderr.strip().splitlines()[-1] == (
            f"vaebench: error: the MLflow tracking server {url} asks for a login and MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD are not set (HTTP 401); set them to your account's (the server's admin login "
            "is in its checkout's .vaebench/server/credentials)"
        )
        assert not (clone / "results").exists()

        # The admin logs a run, with a metric and an artifact the server stores.
        for name, value in admin.items():
            monkeypatch.setenv(name, value)
        client = MlflowClient(url)
        experiment = client.create_experiment("check")
        run_id = client.create_run(experiment).info.run_id
        client.log_metric(run_id, "x", 1.5)
        client.log_text(run_id, "through the server", "note.txt")
        client.set_terminated(run_id)
        assert client.get_run(run_id).info.status == "FINISHED"
        assert [f.path for f in client.list_artifacts(run_id)] == ["note.txt"]

        # A second user (made with MLflow's own API) logs to the admin's experiment (EDIT), but cannot delete.
        from mlflow.server import get_app_client

        get_app_client("basic-auth", tracking_uri=url).create_user("alice", "alice-password-0123")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "alice-password-0123")
        theirs = client.create_run(experiment).info.run_id
        client.log_metric(theirs, "y", 2.0)
        client.set_terminated(theirs)
        with pytest.raises(MlflowException, match="403"):
            client.delete_run(run_id)
    finally:
        stop(tmp_path)

    # The next start of the same checkout reuses the admin login.
    url, _ = start(tmp_path, "--auth", "--postgres", postgres_url)
    try:
        assert login(tmp_path) == admin
        for name, value in admin.items():
            monkeypatch.setenv(name, value)
        assert MlflowClient(url).get_run(run_id).data.metrics == {"x": 1.5}
    finally:
        stop(tmp_path)

    # A credentials file whose password the user store does not take: one line, and nothing left running.
    credentials.write_text(credentials.read_text().replace(password, "not-the-password"))
    refused = vaebench(tmp_path, "server", "start", "--auth", "--port", str(free_port()), "--postgres", postgres_url)
    assert refused.returncode == 2 and "refuses the admin login vaebench-admin" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / ".vaebench/server/state.json").exists()


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@pytest.mark.system
def test_a_server_beyond_loopback_asks_for_a_login_by_default(tmp_path, postgres_url, monkeypatch):
    url, started = start(tmp_path, "--host", "0.0.0.0", "--postgres", postgres_url)
    try:
        assert server_state(tmp_path)["auth"] is True and "login required" in started.stdout
        assert "401" in refused_without_login(url, monkeypatch)
        for name, value in login(tmp_path).items():
            monkeypatch.setenv(name, value)
        assert [e.name for e in MlflowClient(url).search_experiments()] == ["Default"]
    finally:
        stop(tmp_path)
