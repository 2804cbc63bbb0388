"""Real-browser checks: headless Chromium driven by Playwright, and an `mlflow server` to point it at.

Chromium is the system's (Debian's `chromium`, see tests/system_packages.sh), never one Playwright downloads.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.server import alive, end_group, free_port

CHROMIUM = "/usr/bin/chromium"
# Without the last four, Chromium keeps trying to reach Google's services, which a closed network refuses.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 900}
SERVER_START_SECONDS = 60
SERVER_STOP_SECONDS = 20
RENDER_SECONDS = 30


def chromium_path() -> str:
    found = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if found is None:
        raise RuntimeError(
            "Chromium is not installed; run tests/system_packages.sh as root, or apt-get install -y chromium"
        )
    return found


@contextlib.contextmanager
def browser_page() -> Iterator["playwright.sync_api.Page"]:  # noqa: F821
    """A page of a headless Chromium with a fresh profile in a temporary folder; all of it closed at the end."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, sync_playwright() as playwright:
        # Playwright refuses --user-data-dir in args: a persistent context is how it takes a profile folder.
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=chromium_path(),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=VIEWPORT,
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            yield page
        finally:
            context.close()


@contextlib.contextmanager
def mlflow_ui(store_folder: Path) -> Iterator[str]:
    """`mlflow server` on a free loopback port over the folder's mlflow.db and mlartifacts/; yields its base URL.

    The server runs in a session of its own (its workers are further processes), which is stopped as one
    process group by PID at the end; the test fails if any of its processes outlives that."""
    store_folder = Path(store_folder).resolve()
    # Else the server would quietly create an empty store there, and the page would show no runs.
    assert (store_folder / "mlflow.db").is_file(), f"{store_folder} holds no mlflow.db"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The study's experiments name their artifact folders (file://.../mlartifacts/...) themselves; the
    # destination only matters for what the server would create, which must land in the store's folder too.
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{store_folder / 'mlflow.db'}",
        "--artifacts-destination",
        str(store_folder / "mlartifacts"),
    ]
    # Without job execution (judges, scorers: nothing these pages use) the server is 2 processes, not 9,
    # and answers in about 8 s rather than 13 s on two cores.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with _serving(command, store_folder, env, f"{url}/health", "mlflow server"):
        yield url


# While Streamlit runs the script: its status widget, and placeholders for elements not drawn yet.
STREAMLIT_BUSY = '[data-testid="stStatusWidget"], [data-testid="stSkeleton"]'


@contextlib.contextmanager
def streamlit_app(folder: Path, script: Path) -> Iterator[str]:
    """`streamlit run script` on a free loopback port with `folder` as its working directory (a repository
    with params.yaml and results/); yields its base URL; stopped by PID like mlflow_ui."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(script),
        "--server.address",
        "127.0.0.1",
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
    ]
    with _serving(command, Path(folder), dict(os.environ), f"{url}/_stcore/health", "streamlit"):
        yield url


@contextlib.contextmanager
def _serving(command: list[str], cwd: Path, env: dict, health_url: str, name: str) -> Iterator[None]:
    """Run a server in a session of its own until its health URL answers; stop its process group at the end."""
    with tempfile.TemporaryDirectory(prefix="server-log-") as scratch:
        log_path = Path(scratch) / "server.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                command,
                cwd=cwd,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        try:
            _wait_for_health(process, health_url, log_path, name)
            yield
        finally:
            _stop_group(process, name)


def _log_tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _wait_for_health(process: subprocess.Popen, health_url: str, log_path: Path, name: str) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"{name} exited with code {process.returncode} before answering; its log ends:\n{_log_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(health_url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(
        f"{name} did not answer {health_url} within {SERVER_START_SECONDS} s; its log ends:\n{_log_tail(log_path)}"
    )


def _group_pids(group: int) -> list[int]:
    """The live processes of a process group, read from /proc (field 5 of stat is the group)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if int(fields[2]) == group and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _stop_group(process: subprocess.Popen, name: str) -> None:
    """End the server's process group as `vaebench server stop` does, then assert that none of the processes
    the group had is left."""
    pids = {process.pid, *_group_pids(process.pid)}
    end_group(process.pid)
    process.wait(timeout=SERVER_STOP_SECONDS)  # reaps the leader, which would otherwise stay a zombie of this process
    deadline = time.monotonic() + SERVER_STOP_SECONDS
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = sorted(pid for pid in pids if alive(pid))
    assert not left, f"{name} processes {left} outlived the stop of their group {process.pid}"


def screenshot_when_rendered(
    page, texts: Iterable[str], path: Path, timeout_s: float = RENDER_SECONDS, gone: str | None = None
) -> None:
    """Wait until each text is shown in the page (an element whose whole text it is, visible) and, when
    `gone` is a CSS selector, until nothing matches it (a busy indicator, placeholders), then save a
    full-page screenshot to `path`, and a copy to the folder VAEBENCH_SCREENSHOTS names when it is set."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for text in texts:
        try:
            page.get_by_text(text, exact=True).filter(visible=True).first.wait_for(timeout=timeout_s * 1000)
        except PlaywrightTimeout:
            raise AssertionError(f"{text!r} is not shown in {page.url} after {timeout_s} s") from None
    if gone:
        try:
            page.locator(gone).first.wait_for(state="detached", timeout=timeout_s * 1000)
        except PlaywrightTimeout:
            raise AssertionError(f"{gone!r} still matches in {page.url} after {timeout_s} s") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("VAEBENCH_SCREENSHOTS"):
        folder = Path(os.environ["VAEBENCH_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / path.name)
