"""`vaebench server`: one MLflow tracking server on PostgreSQL that a team, or several machines running one
study, log to and browse.

`start` uses the PostgreSQL database a URL names, or creates a private cluster with the machine's
`initdb`/`pg_ctl` under .vaebench/server/postgres; then it starts `mlflow server` with that backend store,
serving every artifact itself from --artifacts (so a client needs only the server's address), bound to
127.0.0.1 unless --host says otherwise. What it started is recorded in .vaebench/server/state.json, and
`stop` ends exactly those processes, by PID.

On a host beyond loopback (or with --auth) the server asks for a login: MLflow's own basic-auth app, with an
admin user whose random password is kept in .vaebench/server/credentials (mode 0600), never on a command line.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import secrets
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
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
ADMIN_USERNAME = "vaebench-admin"
# The admin login, as lines a shell can source (`. .vaebench/server/credentials`), mode 0600.
CREDENTIALS_FILE = SERVER_DIR / "credentials"
# MLflow's basic-auth settings (MLFLOW_AUTH_CONFIG_PATH), rewritten at each start, mode 0600: the store's URL
# in it holds the database password.
AUTH_CONFIG_FILE = SERVER_DIR / "auth.ini"
# What every logged-in user may do on every experiment they did not create (its creator gets MANAGE): EDIT
# reads, creates runs in and logs to it (a second user's shard logs to the study's experiment) but does not
# delete it or its runs, nor change its permissions. READ would refuse that second user's runs.
DEFAULT_PERMISSION = "EDIT"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


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
    if command[0] in ("initdb", "pg_ctl"):
        command = [postgres_tool(command[0]), *command[1:]]
    if os.geteuid() != 0:
        return command
    runuser = shutil.which("runuser", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")  # often off a user's PATH
    if runuser is None or not _postgres_user_exists():
        raise ConfigError(
            "as root, PostgreSQL must run as the user postgres, and this machine has no such user (or no "
            "runuser); install PostgreSQL's package (it creates the user), run as another user, or give "
            "an existing database with --postgres URL"
        )
    return [runuser, "-u", "postgres", "--", *command]


def _postgres_user_exists() -> bool:
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return False
    return True


def wants_auth(host: str, auth: bool = False, no_auth: bool = False) -> bool:
    """Whether the server asks for a login: with --auth; on a host beyond loopback unless --no-auth."""
    if auth and no_auth:
        raise ConfigError("--auth and --no-auth contradict each other; give one of them")
    if auth or no_auth:
        return auth
    return host not in LOOPBACK_HOSTS


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner reads (mode 0600, also when it existed with a wider mode)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)


def admin_credentials() -> tuple[str, str]:
    """The admin's user name and password: from CREDENTIALS_FILE, made (a random password) on the first start."""
    if not CREDENTIALS_FILE.is_file():
        write_private(
            CREDENTIALS_FILE,
            "# The admin login of this checkout's MLflow server (vaebench server start); keep it private.\n"
            f"export MLFLOW_TRACKING_USERNAME={ADMIN_USERNAME}\n"
            f"export MLFLOW_TRACKING_PASSWORD={secrets.token_urlsafe(24)}\n",
        )
    found = dict(
        re.findall(r"^export (MLFLOW_TRACKING_(?:USERNAME|PASSWORD))=(\S+)$", CREDENTIALS_FILE.read_text(), re.M)
    )
    if len(found) != 2:
        raise ConfigError(
            f"{CREDENTIALS_FILE} lacks the line export MLFLOW_TRACKING_USERNAME=... or MLFLOW_TRACKING_PASSWORD=...; "
            "put them back (the admin's password, if the server ran before), or delete the file for a new one"
        )
    return found["MLFLOW_TRACKING_USERNAME"], found["MLFLOW_TRACKING_PASSWORD"]


def write_auth_config(database: str, username: str, password: str) -> Path:
    """MLflow's basic-auth settings. Users and permissions live in the tracking store's own database: they are
    kept, and backed up, with the experiments they refer to, and an existing --postgres database needs no right
    to create another. MLflow keeps them in tables of their own (users, roles, ..., and alembic_version_auth
    for its migrations), apart from the tracking tables. The admin's password is used only to create the
    admin user, on the first start."""

    def value(text: str) -> str:  # configparser's interpolation reads % as a reference
        return text.replace("%", "%%")

    write_private(
        AUTH_CONFIG_FILE,
        "[mlflow]\n"
        f"default_permission = {DEFAULT_PERMISSION}\n"
        f"database_uri = {value(database)}\n"
        f"admin_username = {value(username)}\n"
        f"admin_password = {value(password)}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
    )
    return AUTH_CONFIG_FILE.resolve()


def _log_tail(path: Path) -> str:
    """A log's last three lines, on one line."""
    return " / ".join(path.read_text(errors="replace").strip().splitlines()[-3:])


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no message"


@dataclass
class PrivateCluster:
    """A PostgreSQL cluster in a folder of its own, listening on 127.0.0.1 only, where the superuser logs in
    with a random password kept in a file only its owner reads (so other users of the machine cannot)."""

    folder: Path
    port: int

    @property
    def password_file(self) -> Path:
        return self.folder.parent / "postgres.password"

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://{SUPERUSER}:{self.password_file.read_text().strip()}@127.0.0.1:{self.port}/{database}"

    @property
    def pid(self) -> int:
        return int((self.folder / "postmaster.pid").read_text().split()[0])

    def start(self) -> None:
        if not (self.folder / "PG_VERSION").is_file():
            self._init()
        elif not self.password_file.is_file():
            raise ConfigError(
                f"{self.password_file} is missing, so the cluster in {self.folder} cannot be logged into; "
                f"delete {self.folder} to start a new one"
            )
        log_file = self.folder.parent / "postgres.log"
        log_file.touch()
        if os.geteuid() == 0:
            shutil.chown(log_file, "postgres")
        options = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories=''"
        result = subprocess.run(
            _as_cluster_owner(
                ["pg_ctl", "-D", str(self.folder), "-l", str(log_file), "-o", options, "-w", "-t", "60", "start"]
            ),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise TrackingError(
                f"PostgreSQL in {self.folder} did not start: {_log_tail(log_file) or _last_line(result.stderr)}"
            )
        self.create_database(DATABASE)

    def _init(self) -> None:
        import secrets

        self.folder.mkdir(parents=True, exist_ok=True)
        password = secrets.token_urlsafe(24)
        self.password_file.touch(mode=0o600)
        self.password_file.write_text(password + "\n")
        # initdb reads the password from a file its user can read; it is deleted at once.
        initdb_password = self.folder.parent / "initdb.password"
        initdb_password.touch(mode=0o600)
        initdb_password.write_text(password + "\n")
        try:
            if os.geteuid() == 0:
                _as_cluster_owner(["initdb"])  # fails with one line when the user postgres or runuser is missing
                shutil.chown(self.folder, "postgres", "postgres")
                shutil.chown(initdb_password, "postgres", "postgres")
                reachable = subprocess.run(_as_cluster_owner(["test", "-w", str(self.folder)])).returncode == 0
                if not reachable:
                    raise ConfigError(
                        f"the postgres user cannot reach {self.folder} (a folder above it is private); run from a "
                        f"checkout "
                        "other users can read, or give an existing database with --postgres URL"
                    )
            result = subprocess.run(
                _as_cluster_owner(
                    [
                        "initdb",
                        "-D",
                        str(self.folder),
                        "--auth=scram-sha-256",
                        f"--pwfile={initdb_password}",
                        "-U",
                        SUPERUSER,
                        "-E",
                        "UTF8",
                        "--no-sync",
                    ]
                ),
                capture_output=True,
                text=True,
            )
        finally:
            initdb_password.unlink(missing_ok=True)
        if result.returncode != 0:
            raise TrackingError(f"initdb of {self.folder} failed: {_last_line(result.stderr)}")

    def create_database(self, name: str) -> str:
        """A database of this cluster (created if missing), as a URL."""
        import psycopg

        password = self.password_file.read_text().strip()
        try:
            connection = psycopg.connect(
                host="127.0.0.1", port=self.port, user=SUPERUSER, password=password, dbname="postgres", autocommit=True
            )
            with connection, connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{name}"')
        except psycopg.Error as error:
            raise TrackingError(
                f"cannot create database {name} in the cluster {self.folder}: {_last_line(str(error))}"
            ) from None
        return self.url(name)

    def stop(self) -> None:
        if not (self.folder / "postmaster.pid").is_file():
            return
        pid = self.pid
        result = subprocess.run(
            _as_cluster_owner(["pg_ctl", "-D", str(self.folder), "-m", "fast", "-w", "stop"]),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise TrackingError(f"pg_ctl could not stop PostgreSQL in {self.folder}: {_last_line(result.stderr)}")
        wait_gone(pid)


def check_database(url: str) -> None:
    """One line, before the server starts, when the database is not there or refuses us."""
    import sqlalchemy

    try:
        with sqlalchemy.create_engine(url, connect_args={"connect_timeout": 5}).connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as error:
        reason = str(getattr(error, "orig", error)).strip().splitlines()[0]
        raise TrackingError(
            f"the PostgreSQL database {hide_password(url)} cannot be reached ({reason}); start it or fix --postgres"
        ) from None


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


def start(
    host: str = "127.0.0.1",
    port: int = 5000,
    postgres: str | None = None,
    artifacts: Path | None = None,
    allowed_hosts: str | None = None,
    auth: bool = False,
    no_auth: bool = False,
) -> dict:
    """Start the server (see the module's docstring); `auth`/`no_auth` are --auth/--no-auth (wants_auth)."""
    login = wants_auth(host, auth, no_auth)
    state = read_state()
    if state and alive(state["mlflow_pid"]):
        raise VaebenchError(
            f"this checkout's server already runs at {state['url']} (PID {state['mlflow_pid']}); "
            "stop it first: vaebench server stop"
        )
    check_address(host, port)
    SERVER_DIR.mkdir(parents=True, exist_ok=True)
    credentials = admin_credentials() if login else None
    if not login and host not in LOOPBACK_HOSTS:
        log.warning(
            f"--no-auth on {host}: anyone who reaches port {port} can change or delete every experiment and run"
        )
    cluster = process = None
    try:
        if postgres is None:
            cluster = PrivateCluster((SERVER_DIR / "postgres").resolve(), free_port())
            cluster.start()
            postgres = cluster.url()
        check_database(postgres)
        artifacts = (artifacts or SERVER_DIR / "artifacts").resolve()
        artifacts.mkdir(parents=True, exist_ok=True)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        auth_config = write_auth_config(postgres, *credentials) if credentials else None
        process = _start_mlflow(host, port, postgres, artifacts, allowed_hosts, auth_config)
        _wait_until_answering(process, url)
        if credentials:
            _check_admin_login(url, *credentials)
    except BaseException:  # nothing this command started outlives its failure
        if process is not None:
            end_group(process.pid)
        if cluster is not None:
            cluster.stop()
        raise
    state = {
        "url": url,
        "host": host,
        "port": port,
        "mlflow_pid": process.pid,
        "backend_store": hide_password(postgres),
        "artifacts": str(artifacts),
        "postgres_dir": str(cluster.folder) if cluster else None,
        "postgres_pid": cluster.pid if cluster else None,
        "auth": login,
        "credentials": str(CREDENTIALS_FILE.resolve()) if login else None,
        "username": credentials[0] if credentials else None,
    }
    write_json(STATE_FILE, state)
    return state


def hide_password(url: str) -> str:
    import sqlalchemy

    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


def check_address(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, got {port}")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ConfigError(f"--host {host} is not an address of this machine ({error.strerror})") from None
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({error.strerror}); choose another --port or --host"
            ) from None


def _start_mlflow(
    host: str, port: int, postgres: str, artifacts: Path, allowed_hosts: str | None, auth_config: Path | None
) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--artifacts-destination",
        str(artifacts),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "2",
    ]
    if allowed_hosts:
        # MLflow replaces its defaults (localhost, private addresses) with the list given: keep them, and accept
        # each name given with and without the port.
        from mlflow.server.security_utils import get_default_allowed_hosts

        names = [name.strip() for name in allowed_hosts.split(",") if name.strip()]
        command += [
            "--allowed-hosts",
            ",".join([*get_default_allowed_hosts(), *names, *(f"{n}:{port}" for n in names)]),
        ]
    # The store's URL (with its password) goes through the environment, not the command line `ps` shows.
    # MLflow's job runner (LLM judges, scorers: nothing this pipeline uses) is off unless asked for: measured
    # with two workers, 5 processes instead of 13, answering after 9 s instead of 15.
    env = {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_BACKEND_STORE_URI": postgres,
    }
    if auth_config is not None:
        command += ["--app-name", "basic-auth"]
        # auth.ini names the admin; a shell's MLFLOW_AUTH_ADMIN_* would override it.
        for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
            env.pop(name, None)
        # The Flask secret key signs the sign-up form's CSRF token; one per start, shared by the workers.
        env |= {"MLFLOW_AUTH_CONFIG_PATH": str(auth_config), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}
    with open(SERVER_DIR / "mlflow.log", "ab") as log_file:
        # A session of its own: the server's worker processes form one group that stop() ends together.
        return subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )


def _wait_until_answering(process: subprocess.Popen, url: str) -> None:
    """Wait for /health, which MLflow's basic-auth app leaves open (no login needed)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise TrackingError(
                f"mlflow server exited with code {process.returncode}: {_log_tail(SERVER_DIR / 'mlflow.log')} "
                f"(full log: {SERVER_DIR / 'mlflow.log'})"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    end_group(process.pid)
    raise TrackingError(
        f"mlflow server did not answer at {url} within {START_SECONDS} s; see {SERVER_DIR / 'mlflow.log'}"
    )


def _check_admin_login(url: str, username: str, password: str) -> None:
    """The admin's login works: a store whose admin user was made with another password (say, with a
    credentials file since deleted) fails here with one line, not in every client."""
    import base64
    import urllib.error
    import urllib.request

    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/users/current", headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10):
            return
    except urllib.error.HTTPError as error:
        if error.code == 401:
            raise ConfigError(
                f"the server refuses the admin login {username} of {CREDENTIALS_FILE}: its user store (in the "
                "tracking database) made that user with another password; put that password in the file"
            ) from None
        reason = f"HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        reason = str(getattr(error, "reason", error))
    raise TrackingError(
        f"mlflow server at {url} did not answer the admin's login ({reason}); see {SERVER_DIR / 'mlflow.log'}"
    )


def end_group(pid: int) -> None:
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
    end_group(state["mlflow_pid"])
    if state.get("postgres_dir"):
        PrivateCluster(Path(state["postgres_dir"]), 0).stop()
    STATE_FILE.unlink()
    return state


def wait_gone(pid: int) -> None:
    """Wait for a process to exit (pg_ctl returns once the pid file is gone, a moment before the process
    itself); SIGKILL it after STOP_SECONDS."""
    deadline = time.monotonic() + STOP_SECONDS
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
