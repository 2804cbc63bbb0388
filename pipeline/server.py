"""`vaebench server`: one MLflow tracking server on PostgreSQL that a team, or several machines running one
study, log to and browse.

`start` uses the PostgreSQL database a URL names, or creates a private cluster with the machine's
`initdb`/`pg_ctl` under .vaebench/server/postgres; then it starts `mlflow server` with that backend store,
serving every artifact itself from --artifacts (so a client needs only the server's address), bound to
127.0.0.1 unless --host says otherwise. What it started is recorded in .vaebench/server/state.json, and
`stop` ends exactly those processes, by PID.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.errors import TrackingError, VaebenchError
from pipeline.outputs import write_json

log = logging.getLogger(__name__)
SERVER_DIR = Path(".vaebench") / "server"
STATE_FILE = SERVER_DIR / "state.json"
DATABASE = "mlflow"
SUPERUSER = "vaebench"
START_SECONDS = 120
STOP_SECONDS = 20


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def postgres_tool(name: str) -> str:
    """A PostgreSQL program: on PATH, or where Debian's packages put it (not on PATH)."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise ConfigError(
            f"PostgreSQL's {name} is not installed; install PostgreSQL (Debian: apt-get install -y postgresql) "
            "or give an existing database with --postgres postgresql://USER@HOST:PORT/DB"
        )
    return found


def _as_cluster_owner(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its tools as the `postgres` user."""
    command = [postgres_tool(command[0]), *command[1:]]
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass
class PrivateCluster:
    """A PostgreSQL cluster in a folder of its own, on a loopback TCP port, with trust authentication for
    local connections only (it listens on 127.0.0.1 alone)."""

    folder: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def pid(self) -> int:
        return int((self.folder / "postmaster.pid").read_text().split()[0])

    def start(self) -> None:
        if not (self.folder / "PG_VERSION").is_file():
            self._init()
        log_file = self.folder.parent / "postgres.log"
        log_file.touch()
        if os.geteuid() == 0:
            shutil.chown(log_file, "postgres")
        options = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories=''"
        result = subprocess.run(
            _as_cluster_owner(["pg_ctl", "-D", str(self.folder), "-l", str(log_file), "-o", options, "-w", "-t", "60", "start"]),
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            tail = log_file.read_text(errors="replace").strip().splitlines()[-3:]
            raise TrackingError(f"PostgreSQL in {self.folder} did not start: {' / '.join(tail) or result.stderr.strip()}")
        self._create_database()

    def _init(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
            reachable = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(self.folder)]).returncode == 0
            if not reachable:
                raise ConfigError(
                    f"the postgres user cannot reach {self.folder} (a folder above it is private); run from a checkout "
                    "other users can read, or give an existing database with --postgres URL"
                )
        result = subprocess.run(
            _as_cluster_owner(["initdb", "-D", str(self.folder), "-A", "trust", "-U", SUPERUSER, "-E", "UTF8", "--no-sync"]),
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise TrackingError(f"initdb of {self.folder} failed: {result.stderr.strip().splitlines()[-1]}")

    def _create_database(self) -> None:
        self.create_database(DATABASE)

    def create_database(self, name: str) -> str:
        """A database of this cluster (created if missing), as a URL."""
        import psycopg

        connection = psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if (self.folder / "postmaster.pid").is_file():
            result = subprocess.run(_as_cluster_owner(["pg_ctl", "-D", str(self.folder), "-m", "fast", "-w", "stop"]),
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise TrackingError(f"pg_ctl could not stop PostgreSQL in {self.folder}: {result.stderr.strip()}")


def check_database(url: str) -> None:
    """One line, before the server starts, when the database is not there or refuses us."""
    import sqlalchemy

    try:
        with sqlalchemy.create_engine(url, connect_args={"connect_timeout": 5}).connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as error:
        reason = str(getattr(error, "orig", error)).strip().splitlines()[0]
        raise TrackingError(f"the PostgreSQL database {url} cannot be reached ({reason}); start it or fix --postgres") from None


def read_state() -> dict | None:
    if not STATE_FILE.is_file():
        return None
    try:
        return json.loads(STATE_FILE.read_text())
    except ValueError:
        raise VaebenchError(f"{STATE_FILE} is damaged; stop the server's processes by hand, then delete it") from None


def alive(pid: int) -> bool:
    """Whether the process runs (an exited process not yet reaped by its parent does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def start(host: str = "127.0.0.1", port: int = 5000, postgres: str | None = None, artifacts: Path | None = None,
          allowed_hosts: str | None = None) -> dict:
    state = read_state()
    if state and alive(state["mlflow_pid"]):
        raise VaebenchError(f"this checkout's server already runs at {state['url']} (PID {state['mlflow_pid']}); "
                            "stop it first: vaebench server stop")
    if port_in_use(host, port):
        raise ConfigError(f"port {port} on {host} is in use; choose another with --port")
    SERVER_DIR.mkdir(parents=True, exist_ok=True)
    cluster = None
    if postgres is None:
        cluster = PrivateCluster((SERVER_DIR / "postgres").resolve(), free_port())
        cluster.start()
        postgres = cluster.url
    try:
        check_database(postgres)
        artifacts = (artifacts or SERVER_DIR / "artifacts").resolve()
        artifacts.mkdir(parents=True, exist_ok=True)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        process = _start_mlflow(host, port, postgres, artifacts, allowed_hosts)
        _wait_until_answering(process, url)
    except BaseException:
        if cluster is not None:
            cluster.stop()
        raise
    state = {
        "url": url,
        "host": host,
        "port": port,
        "mlflow_pid": process.pid,
        "backend_store": postgres,
        "artifacts": str(artifacts),
        "postgres_dir": str(cluster.folder) if cluster else None,
        "postgres_pid": cluster.pid if cluster else None,
    }
    write_json(STATE_FILE, state)
    return state


def _start_mlflow(host: str, port: int, postgres: str, artifacts: Path, allowed_hosts: str | None) -> subprocess.Popen:
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres, "--artifacts-destination",
               str(artifacts), "--host", host, "--port", str(port), "--workers", "2"]
    if allowed_hosts:
        command += ["--allowed-hosts", allowed_hosts]
    log_file = open(SERVER_DIR / "mlflow.log", "ab")
    # A session of its own: the server's worker processes form one group that stop() ends together.
    return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})


def _wait_until_answering(process: subprocess.Popen, url: str) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = (SERVER_DIR / "mlflow.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise TrackingError(f"mlflow server exited with code {process.returncode}: {' / '.join(tail)} "
                                f"(full log: {SERVER_DIR / 'mlflow.log'})")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    _end_group(process.pid)
    raise TrackingError(f"mlflow server did not answer at {url} within {START_SECONDS} s; see {SERVER_DIR / 'mlflow.log'}")


def _end_group(pid: int) -> None:
    """SIGTERM to the server's process group, SIGKILL to what is left after STOP_SECONDS."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_SECONDS
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        _reap(pid)
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop() -> dict | None:
    """Stop what `start` started in this checkout; None when nothing was started."""
    state = read_state()
    if state is None:
        return None
    _end_group(state["mlflow_pid"])
    if state.get("postgres_dir"):
        PrivateCluster(Path(state["postgres_dir"]), 0).stop()
        _wait_gone(state["postgres_pid"])
    STATE_FILE.unlink()
    return state


def _wait_gone(pid: int) -> None:
    """pg_ctl returns once the pid file is gone, a moment before the process itself."""
    deadline = time.monotonic() + STOP_SECONDS
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
