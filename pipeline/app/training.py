"""Train, then generate: the app trains with the pipeline's own commands (`vaebench prepare` and `vaebench
train CELL`, the same engine, checks and MLflow logging as a study cell), run as processes in a scratch
workspace, .vaebench/app/, whose params.yaml holds study `app` with the one cell and the chosen training-set
size. The model lands in results/app/train/<cell>/ (the workspace's results/app is a link to it), where the
study browser and the latent explorer find it; its run is in the study's MLflow store, experiment vaebench-app.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config import PARAMS_FILE, ConfigError, StudyConfig, load_study, parse_study_text
from pipeline.errors import VaebenchError
from pipeline.models import FAMILIES
from pipeline.outputs import read_json, repository_root, write_text
from pipeline.paths import CLASSIFIER_DIR, CLASSIFIER_FILE, PREPARED_FILE, PREPARED_SUMMARY, RESULTS
from pipeline.server import end_group

APP_STUDY = "app"
WORKSPACE = Path(".vaebench") / "app"
# The train stage's log line per epoch (pipeline/train.py).
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+)\s+train loss (\S+)\s+val (.*)$")
VALUE = re.compile(r"(\S+) (\S+)")


def starting_settings(family: str) -> str:
    """What the settings box starts with for a family: its settings' defaults (any key its cells accept works)."""
    settings = FAMILIES[family].starting_settings()
    return yaml.safe_dump(settings, sort_keys=False).strip() if settings else ""


@dataclass(frozen=True)
class Request:
    """What the train page asks for."""

    family: str
    arch: str
    latent_dim: int
    epochs: int
    train_size: int
    settings: str  # the family's own keys, as YAML
    seed: int = 0
    evaluate: bool = False  # also run the evaluate stage (every test metric, as for a study cell)

    @property
    def model_name(self) -> str:
        """The cell's name in a params.yaml: what it trains, its settings as a short hash when it has any."""
        settings = family_settings(self)
        tag = f"-{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:6]}" if settings else ""
        return f"{self.family}-{self.arch}-z{self.latent_dim}{tag}-s{self.seed}"

    @property
    def cell_name(self) -> str:
        """The name in study `app`, where the training-set size and epochs tell models apart too."""
        return f"{self.model_name}-n{self.train_size}-e{self.epochs}"


# Set by the page's own fields, so not in the settings box.
PAGE_KEYS = ("family", "arch", "latent_dim", "epochs", "seed", "init_from")


def family_settings(request: Request) -> dict:
    """The settings box as a mapping; not readable YAML, not a mapping, or a key the page sets: ConfigError."""
    try:
        settings = yaml.safe_load(request.settings) if request.settings.strip() else {}
    except yaml.YAMLError as error:
        raise ConfigError(
            f"the family settings are not readable YAML ({str(error).splitlines()[0]}); write them as key: value lines"
        ) from None
    if not isinstance(settings, dict):
        raise ConfigError(f"the family settings must be key: value lines, got {request.settings!r}")
    taken = [key for key in settings if key in PAGE_KEYS]
    if taken:
        raise ConfigError(
            f"the family settings set {taken[0]}, which the page's own field sets; remove it from the settings"
        )
    return settings


def cell_spec(request: Request) -> dict:
    """The cell as it would stand under `cells:` in params.yaml."""
    return {
        "family": request.family,
        "arch": request.arch,
        "latent_dim": request.latent_dim,
        "epochs": request.epochs,
        "seed": request.seed,
        **family_settings(request),
    }


def study_text(request: Request, base: Path = PARAMS_FILE) -> str:
    """The app's params.yaml: the active one's settings (itself validated first), study `app`, this one cell
    and `train_size` training images."""
    load_study(base)  # the base file itself is valid (its own one-line error otherwise)
    document = yaml.safe_load(Path(base).read_text())
    document["study"] = APP_STUDY
    document["data"] = {**document["data"], "train_size": request.train_size}
    document["cells"] = {request.cell_name: cell_spec(request)}
    document["finetuned"] = {}
    document.pop("tune", None)
    return yaml.safe_dump(document, sort_keys=False)


def app_study(request: Request, base: Path = PARAMS_FILE) -> tuple[StudyConfig, str]:
    """The app's study, validated as every stage validates params.yaml, and its text. Raises ConfigError with
    the same one-line message the command line gives for that file."""
    text = study_text(request, base)
    return parse_study_text(text, "the app's settings"), text


def snippet(request: Request) -> str:
    """The cell as a line to paste under `cells:` in params.yaml."""
    return yaml.safe_dump(
        {request.model_name: cell_spec(request)}, default_flow_style=None, sort_keys=False, width=1_000
    ).strip()


def prepare_workspace(workspace: Path, text: str) -> None:
    """Give the workspace the app's params.yaml and relative links to results/app and the classifier (so a
    moved or copied checkout keeps its own). Only under only_training's lock."""
    (workspace / RESULTS).mkdir(parents=True, exist_ok=True)
    (RESULTS / APP_STUDY).mkdir(parents=True, exist_ok=True)
    for name in (APP_STUDY, CLASSIFIER_DIR.name):
        link = workspace / RESULTS / name
        target = os.path.relpath((RESULTS / name).resolve(), link.parent)
        if link.is_symlink() and os.readlink(link) != target:
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(target, target_is_directory=True)
    write_text(workspace / PARAMS_FILE, text)


def prepared_for(workspace: Path, config: StudyConfig) -> bool:
    """Whether the workspace's prepared data has the split the app's study asks for (the split's only inputs
    besides the checksum-verified MNIST files)."""
    summary = workspace / PREPARED_SUMMARY
    if not summary.is_file() or not (workspace / PREPARED_FILE).is_file():
        return False
    recorded, data = read_json(summary), config.data
    return (
        recorded["images"] == {"train": data.train_size, "val": data.val_size, "test": data.test_size}
        and recorded["split_seed"] == data.split_seed
    )


@contextmanager
def only_training(workspace: Path) -> Iterator[None]:
    """One training from the app at a time (the workspace holds one params.yaml and one prepared split): taken
    before anything is written there, so a refused request changes nothing."""
    workspace.mkdir(parents=True, exist_ok=True)
    with open(workspace / "training.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VaebenchError("another training from the app is running; wait until it finishes") from None
        yield


def run_stage(workspace: Path, arguments: list[str], on_line: Callable[[str], None]) -> None:
    """`python -m pipeline ARGUMENTS` in the workspace, each output line handed to on_line; its one-line
    error (or its last lines) raised as a VaebenchError when it fails. If the page stops (a rerun, a
    closed session), its process group is stopped as `vaebench server stop` stops a server (SIGTERM, then
    SIGKILL after a grace period); the train command ends its MLflow run as KILLED."""
    env = {**os.environ, "DVC_ROOT": str(repository_root())}  # the study's MLflow store and data root
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *arguments],
        cwd=workspace,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    try:
        for line in process.stdout:
            lines.append(line.rstrip())
            on_line(line.rstrip())
        code = process.wait()
    except BaseException:
        end_group(process.pid)
        process.wait()
        raise
    if code != 0:
        errors = [line for line in lines if line.startswith("vaebench: error:")]
        raise VaebenchError(errors[-1].removeprefix("vaebench: error: ") if errors else "\n".join(lines[-15:]))


def train(request: Request, on_epoch: Callable[[dict], None], base: Path = PARAMS_FILE) -> str:
    """Validate, then prepare the data when the split changed, then train the cell (and evaluate it when
    asked); `on_epoch` gets each epoch's {epoch, epochs, train_loss, val_*}. Returns the cell's name.
    Bad settings raise ConfigError before anything is written."""
    config, text = app_study(request, base)
    if FAMILIES[request.family].capabilities.adversarial and not CLASSIFIER_FILE.is_file():
        raise ConfigError(
            f"family {request.family} scores its samples every epoch with the MNIST classifier, "
            f"which is not trained yet; run `dvc repro classifier` first"
        )
    workspace = WORKSPACE.resolve()
    with only_training(workspace):
        prepare_workspace(workspace, text)
        if not prepared_for(workspace, config):
            run_stage(workspace, ["prepare"], lambda line: None)

        def on_line(line: str) -> None:
            match = EPOCH_LINE.search(line)
            if match:
                epoch, epochs, train_loss, rest = match.groups()
                values = {f"val_{key}": float(value) for key, value in VALUE.findall(rest)}
                on_epoch({"epoch": int(epoch), "epochs": int(epochs), "train_loss": float(train_loss), **values})

        run_stage(workspace, ["train", "--", request.cell_name], on_line)
        if request.evaluate:
            run_stage(workspace, ["evaluate", "--", request.cell_name], lambda line: None)
    return request.cell_name


def workspace_prepared_file() -> Path:
    """The app's own prepared split (what the explorer falls back to when the study has none)."""
    return WORKSPACE / PREPARED_FILE
