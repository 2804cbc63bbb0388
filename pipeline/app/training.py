"""Train, then generate: the app trains with the pipeline's own commands (`vaebench prepare` and `vaebench
train CELL`, the same engine, checks and MLflow logging as a study cell), run as processes in a scratch
workspace, .vaebench/app/, whose params.yaml holds study `app` with the one cell and the chosen training-set
size. The model lands in results/app/train/<cell>/ (the workspace's results/app is a link to it), where the
study browser and the latent explorer find it; its run is in the study's MLflow store, experiment vaebench-app.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config import PARAMS_FILE, ConfigError, StudyConfig, parse_study_text
from pipeline.errors import VaebenchError
from pipeline.outputs import CLASSIFIER_DIR, PREPARED_SUMMARY, RESULTS, read_json, repository_root, write_text

APP_STUDY = "app"
WORKSPACE = Path(".vaebench") / "app"
# The train stage's log line per epoch (pipeline/train.py).
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+)\s+train loss (\S+)\s+val (.*)$")
VALUE = re.compile(r"(\S+) (\S+)")
FAMILY_SETTINGS = {  # what the settings box starts with for each family (any key its cells accept works)
    "vae": "beta: 1.0",
    "ae": "",
    "dae": "noise: gaussian\nnoise_std: 0.5",
    "cae": "contraction_weight: 0.1",
    "gan": "lr: 0.0002",
    "vaegan": "beta: 1.0",
}


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

    @property
    def cell_name(self) -> str:
        return f"{self.family}-{self.arch}-z{self.latent_dim}-n{self.train_size}-e{self.epochs}-s{self.seed}"


def cell_spec(request: Request) -> dict:
    """The cell as it would stand under `cells:` in params.yaml; a settings box that is not a YAML mapping is a ConfigError."""
    try:
        settings = yaml.safe_load(request.settings) if request.settings.strip() else {}
    except yaml.YAMLError as error:
        raise ConfigError(f"the family settings are not readable YAML ({str(error).splitlines()[0]}); write them as key: value lines") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"the family settings must be key: value lines, got {request.settings!r}")
    return {"family": request.family, "arch": request.arch, "latent_dim": request.latent_dim,
            "epochs": request.epochs, "seed": request.seed, **settings}


def app_study(request: Request, base: Path = PARAMS_FILE) -> tuple[StudyConfig, str]:
    """The app's study (the active params.yaml's settings, study `app`, this one cell, `train_size` training
    images), validated as every stage validates params.yaml, and its text. Raises ConfigError with the
    same one-line message the command line gives."""
    try:
        document = yaml.safe_load(Path(base).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{base} not found; start the app from the repository root") from None
    document["study"] = APP_STUDY
    document["data"] = {**document["data"], "train_size": request.train_size}
    document["cells"] = {request.cell_name: cell_spec(request)}
    document["finetuned"] = {}
    document.pop("tune", None)
    text = yaml.safe_dump(document, sort_keys=False)
    return parse_study_text(text, "the app's settings"), text


def snippet(request: Request) -> str:
    """The cell as a line to paste under `cells:` in params.yaml."""
    return yaml.safe_dump({request.cell_name: cell_spec(request)}, default_flow_style=None, sort_keys=False,
                          width=1_000).strip()


def prepare_workspace(config: StudyConfig, text: str) -> Path:
    """The workspace with the app's params.yaml, links to the study's classifier and to results/app."""
    workspace = WORKSPACE.resolve()
    (workspace / RESULTS).mkdir(parents=True, exist_ok=True)
    (RESULTS / APP_STUDY).mkdir(parents=True, exist_ok=True)
    links = {workspace / RESULTS / APP_STUDY: (RESULTS / APP_STUDY).resolve(),
             workspace / CLASSIFIER_DIR: CLASSIFIER_DIR.resolve()}
    for link, target in links.items():
        if not link.is_symlink():
            link.symlink_to(target, target_is_directory=True)
    write_text(workspace / PARAMS_FILE, text)
    return workspace


def prepared_for(workspace: Path, config: StudyConfig) -> bool:
    """Whether the workspace's prepared data has the split the app's study asks for."""
    summary = workspace / PREPARED_SUMMARY
    if not summary.is_file():
        return False
    images, data = read_json(summary)["images"], config.data
    return (images == {"train": data.train_size, "val": data.val_size, "test": data.test_size}
            and read_json(summary)["split_seed"] == data.split_seed)


def run_stage(workspace: Path, arguments: list[str], on_line: Callable[[str], None]) -> None:
    """`python -m pipeline ARGUMENTS` in the workspace, each output line handed to on_line; its one-line
    error (or its last lines) raised as a VaebenchError when it fails."""
    env = {**os.environ, "DVC_ROOT": str(repository_root())}  # the study's MLflow store and data root
    process = subprocess.Popen([sys.executable, "-m", "pipeline", *arguments], cwd=workspace, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line.rstrip())
            on_line(line.rstrip())
        code = process.wait()
    except BaseException:  # the page was closed or re-run: the train command ends its MLflow run as KILLED
        process.terminate()
        process.wait()
        raise
    if code != 0:
        errors = [line for line in lines if line.startswith("vaebench: error:")]
        raise VaebenchError(errors[-1].removeprefix("vaebench: error: ") if errors else "\n".join(lines[-15:]))


def train(request: Request, on_epoch: Callable[[dict], None], base: Path = PARAMS_FILE) -> str:
    """Validate, then prepare the data when the split changed, then train the cell; `on_epoch` gets each
    epoch's {epoch, epochs, train_loss, val_*}. Returns the cell's name. Bad settings raise ConfigError
    before anything is written."""
    config, text = app_study(request, base)
    workspace = prepare_workspace(config, text)
    if not prepared_for(workspace, config):
        run_stage(workspace, ["prepare"], lambda line: None)

    def on_line(line: str) -> None:
        match = EPOCH_LINE.search(line)
        if match:
            epoch, epochs, train_loss, rest = match.groups()
            values = {f"val_{key}": float(value) for key, value in VALUE.findall(rest)}
            on_epoch({"epoch": int(epoch), "epochs": int(epochs), "train_loss": float(train_loss), **values})

    run_stage(workspace, ["train", request.cell_name], on_line)
    return request.cell_name
