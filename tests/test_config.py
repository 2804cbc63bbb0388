import subprocess
import sys

import pytest
import yaml

from conftest import REPO, TINY_STUDY
from pipeline import cli
from pipeline.config import LONGEST_SUFFIX, ConfigError, load_study, max_name_length, parse_study, parse_study_text


def tiny_raw() -> dict:
    return yaml.safe_load(TINY_STUDY.read_text())


def with_cell(**changes) -> dict:
    raw = tiny_raw()
    raw["cells"]["linear-z2-b1-s0"].update(changes)
    return raw


def finetuned(name="ft", **changes) -> dict:
    """The tiny study with one fine-tuned cell (a GAN from linear-z2-b1-s0, with changes)."""
    raw = tiny_raw()
    spec = {"family": "gan", "arch": "linear", "latent_dim": 2, "seed": 0, "init_from": "linear-z2-b1-s0", **changes}
    raw["finetuned"] = {name: {key: value for key, value in spec.items() if value is not None}}  # None: key left out
    return raw


def as_family(family: str, **settings) -> dict:
    """The tiny study with its first cell made a cell of another family."""
    raw = tiny_raw()
    raw["cells"]["linear-z2-b1-s0"] = {"family": family, "arch": "linear", "latent_dim": 2, "seed": 0, **settings}
    raw["finetuned"] = {}  # its fine-tuned cell starts from a VAE
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
        (
            {**tiny_raw(), "data": {**tiny_raw()["data"], "binarize": "static"}},
            "data.binarize is 'static'; choose one of none, dynamic",
        ),
        (with_cell(activation="sigmoid"), "cells.linear-z2-b1-s0.activation is 'sigmoid'; choose one of relu, tanh"),
        (
            with_cell(arch="conv", activation="tanh"),
            "cells.linear-z2-b1-s0.activation is 'tanh', but it sets the MLP's nonlinearity and the conv networks use",
        ),
        (with_cell(adam_eps=0), "cells.linear-z2-b1-s0.adam_eps must be > 0, got 0"),
        (with_cell(adam_betas=[0.9, 1.0]), "cells.linear-z2-b1-s0.adam_betas[1] must be below 1, got 1"),
        (with_cell(adam_betas=0.9), "cells.linear-z2-b1-s0.adam_betas must be a list of two numbers in [0, 1)"),
        (
            with_cell(lr_schedule=[[1, 0.001], [1, 0.0005]]),
            "cells.linear-z2-b1-s0.lr_schedule: its stages add up to 2 epochs but the cell trains 1; set epochs: 2 or",
        ),
        (
            with_cell(epochs=2, lr_schedule=[[1, 0.001], [1, 0]]),
            "cells.linear-z2-b1-s0.lr_schedule[1][1] (rate) must be > 0, got 0",
        ),
        (
            with_cell(epochs=2, lr_schedule=[[1, 0.001], [1, -0.1]]),
            "cells.linear-z2-b1-s0.lr_schedule[1][1] (rate) must be > 0, got -0.1",
        ),
        (
            with_cell(epochs=2, lr_schedule=[[2, 0.01]]),
            "cells.linear-z2-b1-s0.lr_schedule starts at rate 0.01 but the cell's lr is 0.001; set lr: 0.01",
        ),
        (with_cell(lr_schedule=[1, 0.001]), "cells.linear-z2-b1-s0.lr_schedule[0] must be one [epochs, rate] pair"),
        (
            as_family("gan", adam_eps=1e-4),
            "cells.linear-z2-b1-s0.adam_eps: family gan sets its own Adam (its adam_beta1 setting); remove the key",
        ),
        ({**tiny_raw(), "cells": {}}, "cells is empty"),
        (
            with_cell(family="flow"),
            "cells.linear-z2-b1-s0.family is 'flow'; choose one of vae, ae, dae, cae, gan, vaegan",
        ),
        (
            with_cell(noise_std=0.3),
            "cells.linear-z2-b1-s0.noise_std is a setting of family dae, not of vae; remove it or set family: dae",
        ),
        (as_family("ae", beta=1.0), "cells.linear-z2-b1-s0.beta is a setting of family vae and vaegan, not of ae"),
        (
            with_cell(r1_weight=1.0),
            "cells.linear-z2-b1-s0.r1_weight is a setting of family gan and vaegan, not of vae; "
            "remove it or set family: gan",
        ),
        (as_family("gan", r1_weight=-1), "cells.linear-z2-b1-s0.r1_weight must be >= 0, got -1"),
        (as_family("gan", disc_lr=-0.001), "cells.linear-z2-b1-s0.disc_lr must be > 0, got -0.001"),
        (as_family("gan", lr=-0.001), "cells.linear-z2-b1-s0.lr must be > 0, got -0.001"),
        (as_family("gan", adam_beta1=1.0), "cells.linear-z2-b1-s0.adam_beta1 must be in [0, 1), got 1"),
        (
            as_family("vaegan", recon_space="latent"),
            "cells.linear-z2-b1-s0.recon_space is 'latent'; choose one of features, pixels",
        ),
        (
            with_cell(init_from="conv-z2-b1-s0"),
            "cells.linear-z2-b1-s0.init_from: a fine-tuned cell goes under finetuned:",
        ),
        (
            finetuned(init_from="nowhere"),
            "finetuned.ft.init_from is 'nowhere', not a cell under cells:; vae cells: linear-z2-b1-s0, conv-z2-b1-s0",
        ),
        (
            finetuned(init_from="ae-linear-z2-s0", arch="linear"),
            "finetuned.ft.init_from: ae-linear-z2-s0 is a cell of family ae; name a vae cell",
        ),
        (
            finetuned(init_from="conv-z2-b1-s0", arch="linear"),
            "finetuned.ft.arch is 'linear' but its init_from cell conv-z2-b1-s0 "
            "has 'conv'; the networks must match to copy the weights",
        ),
        (finetuned(latent_dim=3), "finetuned.ft.latent_dim is 3 but its init_from cell linear-z2-b1-s0 has 2"),
        (
            finetuned(init_from=["linear-z2-b1-s0"]),
            "finetuned.ft.init_from is ['linear-z2-b1-s0'], not a cell under cells:",
        ),
        (
            as_family("gan", init_discriminator=True),
            "cells.linear-z2-b1-s0.init_discriminator starts the discriminator "
            "from a VAE's encoder, so it needs init_from",
        ),
        (finetuned(family="ae"), "finetuned.ft: family ae cannot start from another cell; use family gan, vaegan"),
        (finetuned(name="linear-z2-b1-s0"), "finetuned.linear-z2-b1-s0: the name is already a cell under cells:"),
        (as_family("dae", noise_std=-0.1), "cells.linear-z2-b1-s0.noise_std must be >= 0, got -0.1"),
        (as_family("dae", noise="mask", mask_prob=1.0), "cells.linear-z2-b1-s0.mask_prob must be in [0, 1), got 1"),
        (as_family("dae", noise="mask", mask_prob=-0.2), "cells.linear-z2-b1-s0.mask_prob must be >= 0, got -0.2"),
        (
            as_family("dae", noise="mask", noise_std=0.5),
            "cells.linear-z2-b1-s0.noise_std does not apply to noise: mask",
        ),
        (as_family("dae", noise="salt"), "cells.linear-z2-b1-s0.noise is 'salt'; choose one of gaussian, mask"),
        (as_family("cae", contraction_weight=-1), "cells.linear-z2-b1-s0.contraction_weight must be >= 0, got -1"),
        (
            with_cell(arch="conv", channels=[4, 8, 16, 32, 64]),
            "cells.linear-z2-b1-s0.channels = [4, 8, 16, 32, 64]: 5 strided "
            "convolutions shrink a 28x28 image to nothing; use at most 4 entries",
        ),
        ({**tiny_raw(), "cells": {"a.b": {"arch": "linear"}}}, "cell name 'a.b' must use only"),
        ({**tiny_raw(), "cells": {"-x": {"family": "vae"}}}, "cell name '-x' must use only letters, digits, '-' and "),
        ({**tiny_raw(), "cells": {"--help": {"family": "vae"}}}, "cell name '--help' must use only"),
        ({**tiny_raw(), "cells": {"ab\n": {"family": "vae"}}}, "cell name 'ab\\n' must use only"),
        (
            {**tiny_raw(), "study": "s" * (max_name_length() + 1)},
            f"start with a letter or digit and have at most {max_name_length()} characters",
        ),
        (
            {**tiny_raw(), "cells": {"z" * (max_name_length() + 1): {"family": "vae"}}},
            f"have at most {max_name_length()} characters (it names folders, files and MLflow runs)",
        ),
        (
            {**tiny_raw(), "cells": {**tiny_raw()["cells"], "copy": tiny_raw()["cells"]["linear-z2-b1-s0"]}},
            "params: cells linear-z2-b1-s0 and copy have the same configuration and seed; remove one",
        ),
        (
            {**tiny_raw(), "cells": {"lin": {"arch": "linear", "latent_dim": 2, "seed": 0}}},
            "params: cells.lin.family is missing; name the cell's family (vae, ae, dae, cae, gan, vaegan, iwae, "
            "vqvae, pca): dvc.yaml makes the cell's stages depend on pipeline/models/<family>.py",
        ),
        (
            finetuned(family=None),
            "params: finetuned.ft.family is missing; name the cell's family",
        ),
    ],
)
def test_bad_values_are_named_with_the_fix(raw, message):
    with pytest.raises(ConfigError) as error:
        parse_study(raw)
    assert message in str(error.value)


def test_family_settings_default_and_round_trip():
    from pipeline.config import cell_as_dict, parse_cell

    config = parse_study(as_family("dae", noise="mask", seed=1))  # seed 0 would repeat dae-linear-z2-s0
    cell = config.cell("linear-z2-b1-s0")
    assert (cell.family, cell.settings.noise, cell.settings.mask_prob, cell.settings.noise_std) == (
        "dae",
        "mask",
        0.25,
        None,
    )
    assert config.cell("conv-z2-b1-s0").settings.beta == 1.0
    for cell in config.cells.values():
        flat = cell_as_dict(cell)
        assert parse_cell(flat.pop("name"), flat, {}) == cell


def test_the_longest_allowed_cell_name_is_accepted_and_its_longest_file_can_be_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "c" * max_name_length()
    raw = tiny_raw()
    raw["cells"][name] = {**raw["cells"].pop("linear-z2-b1-s0")}
    raw["finetuned"] = {}
    assert name in parse_study(raw).cells
    (tmp_path / f"{name}{LONGEST_SUFFIX}").write_text("a resume checkpoint being written")


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


def committed_params() -> str:
    """params.yaml as committed: the working copy is the user's to switch (`make study STUDY=...`)."""
    return subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout


def test_every_shipped_study_is_valid():
    for path in sorted((REPO / "studies").glob("*.yaml")):
        assert load_study(path).cells, path
    assert parse_study_text(committed_params(), "params.yaml").cells


def test_the_committed_params_are_the_default_study():
    # `make tune` adds entries under tune:, so that block may differ.
    default = yaml.safe_load((REPO / "studies" / "default.yaml").read_text())
    params = yaml.safe_load(committed_params())
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
        ({"family": "cae", "beta": 1.0}, "beta is a setting of family vae and vaegan, not of cae"),
        ({"r1_weight": 1.0}, "r1_weight is a setting of family gan and vaegan, not of vae"),
        ({"contraction_weight": 0.5}, "contraction_weight is a setting of family cae, not of vae"),
        ({"lr_schedule": [[5, 0.001]]}, "lr_schedule: its stages add up to 5 epochs but the cell trains"),
    ],
)
def test_cli_rejects_bad_input_with_one_line_before_training(workdir, capsys, change, message):
    # In-process (the command line itself is run in a subprocess by the next test).
    params = workdir / "params.yaml"
    params.write_text(yaml.safe_dump(with_cell(**change)))
    assert cli.main(["--params", str(params), "train", "linear-z2-b1-s0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vaebench: error: ") and message in lines[0]
    assert sorted(path.name for path in workdir.iterdir()) == ["params.yaml"]


def test_cli_rejects_an_unreadable_params_file_and_an_unknown_cell(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("cells: {unclosed\n")
    result = run_cli("--params", str(params), "train", "x", cwd=tmp_path)
    assert result.returncode == 2 and "not readable YAML" in result.stderr
    params.write_text(yaml.safe_dump(tiny_raw()))
    result = run_cli("--params", str(params), "train", "conv-z99-b1-s0", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown cell 'conv-z99-b1-s0'" in result.stderr and "linear-z2-b1-s0" in result.stderr


def test_check_names_the_cell_whose_conv_channels_are_too_deep(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(with_cell(arch="conv", channels=[8, 8, 8, 8, 8])))
    result = run_cli("--params", str(params), "check", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (
        "vaebench: error: cells.linear-z2-b1-s0.channels = [8, 8, 8, 8, 8]: 5 strided convolutions shrink a "
        "28x28 image to nothing; use at most 4 entries"
    )
