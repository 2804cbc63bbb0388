import subprocess
import sys

import pytest
import yaml

from pipeline.config import ConfigError, load_study, parse_study

from conftest import REPO, TINY_STUDY


def tiny_raw() -> dict:
    return yaml.safe_load(TINY_STUDY.read_text())


def with_cell(**changes) -> dict:
    raw = tiny_raw()
    raw["cells"]["linear-z2-b1-s0"].update(changes)
    return raw


@pytest.mark.parametrize(
    "raw, message",
    [
        (with_cell(arch="mlp"), "cells.linear-z2-b1-s0.arch is 'mlp'; choose one of linear, conv"),
        (with_cell(latent_dim=0), "cells.linear-z2-b1-s0.latent_dim must be >= 1, got 0"),
        (with_cell(beta=-0.5), "cells.linear-z2-b1-s0.beta must be >= 0, got -0.5"),
        (with_cell(latent_dim="ten"), "cells.linear-z2-b1-s0.latent_dim must be an integer >= 1, got 'ten'"),
        (with_cell(beta="big"), "cells.linear-z2-b1-s0.beta must be a finite number, got 'big'"),
        (with_cell(lr=0), "cells.linear-z2-b1-s0.lr must be > 0"),
        (with_cell(device="tpu"), "cells.linear-z2-b1-s0.device is 'tpu'"),
        (with_cell(width=3), "cells.linear-z2-b1-s0: unknown key 'width'"),
        ({**tiny_raw(), "cells": {}}, "cells is empty"),
        ({**tiny_raw(), "cells": {"a.b": {"arch": "linear"}}}, "cell name 'a.b' must use only"),
    ],
)
def test_bad_values_are_named_with_the_fix(raw, message):
    with pytest.raises(ConfigError) as error:
        parse_study(raw)
    assert message in str(error.value)


def test_exponent_without_a_dot_is_a_number():
    # YAML 1.1 reads 1e-3 as a string; a researcher writing it means the number.
    assert parse_study(with_cell(lr="1e-3")).cell("linear-z2-b1-s0").lr == 0.001


def test_unreadable_params_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("study: [unclosed\n")
    with pytest.raises(ConfigError, match="not readable YAML"):
        load_study(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_study(tmp_path / "missing.yaml")


def test_data_sizes_must_fit_mnist():
    raw = tiny_raw()
    raw["data"]["train_size"] = 59_000
    raw["data"]["val_size"] = 5_000
    with pytest.raises(ConfigError, match="exceeds the 60000 MNIST training images"):
        parse_study(raw)


def test_every_shipped_study_is_valid():
    for path in [REPO / "params.yaml", *sorted((REPO / "studies").glob("*.yaml"))]:
        assert load_study(path).cells, path


def test_default_study_file_is_the_default_params():
    # `make tune` adds entries under tune:, so that block may differ.
    default, params = (yaml.safe_load((REPO / name).read_text()) for name in ("studies/default.yaml", "params.yaml"))
    default.pop("tune"), params.pop("tune")
    assert default == params


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"arch": "mlp"}, "arch is 'mlp'"),
        ({"latent_dim": 0}, "latent_dim must be >= 1"),
        ({"beta": -1}, "beta must be >= 0"),
        ({"seed": "zero"}, "seed must be an integer"),
    ],
)
def test_cli_rejects_bad_input_with_one_line_before_training(tmp_path, change, message):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(with_cell(**change)))
    result = run_cli("--params", str(params), "train", "linear-z2-b1-s0", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vaebench: error: ") and message in lines[0]
    assert not (tmp_path / "results").exists()


def test_cli_rejects_an_unreadable_params_file_and_an_unknown_cell(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("cells: {unclosed\n")
    result = run_cli("--params", str(params), "train", "x", cwd=tmp_path)
    assert result.returncode == 2 and "not readable YAML" in result.stderr
    params.write_text(yaml.safe_dump(tiny_raw()))
    result = run_cli("--params", str(params), "train", "conv-z99-b1-s0", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown cell 'conv-z99-b1-s0'" in result.stderr and "linear-z2-b1-s0" in result.stderr
