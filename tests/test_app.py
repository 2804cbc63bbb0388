"""The app (pipeline/app/): each page through Streamlit's AppTest (no browser), then the real thing in
headless Chromium. They share one tiny study, built once for this module: a prepared split, the classifier
and three trained and evaluated cells (a 2-D VAE, a 2-D plain autoencoder, a GAN); a test that writes (the
train page) works on its own copy of it."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_STUDY

APP = REPO / "pipeline" / "app" / "main.py"
CELLS = ["linear-z2-b1-s0", "ae-linear-z2-s0", "gan-conv-z2-s0"]
TIMEOUT = 120  # seconds of one script run: training runs inside it


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from pipeline.classifier import train_classifier
    from pipeline.config import load_study
    from pipeline.evaluate import evaluate_cell
    from pipeline.prepare import prepare
    from pipeline.train import train_cell

    folder = tmp_path_factory.mktemp("app-study")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        shutil.copyfile(TINY_STUDY, folder / "params.yaml")
        config = load_study(folder / "params.yaml")
        prepare(config)
        train_classifier(config)
        for name in CELLS:
            train_cell(config, name)
            evaluate_cell(config, name)
    return folder


@pytest.fixture(autouse=True)
def fresh_caches():
    """Streamlit's caches live as long as the process: no test sees models or data another test loaded."""
    import streamlit as st

    st.cache_resource.clear()
    st.cache_data.clear()


@pytest.fixture
def in_study(study, monkeypatch):
    monkeypatch.chdir(study)
    return study


@pytest.fixture
def own_study(study, tmp_path, monkeypatch):
    """A copy of the study that the test may write into, with its MLflow store."""
    import mlflow

    copy = tmp_path / "study"
    shutil.copytree(study, copy, symlinks=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{copy / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{copy / 'mlflow.db'}")
    return copy


def app_on(page: str):
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    app.query_params["page"] = page
    app.run()
    assert not app.exception, app.exception
    return app


def decoded_images(app) -> list[str]:
    """The address of every picture the page shows, in order. Streamlit names a picture after a hash of its
    bytes (memory_media_file_storage), so two addresses differ exactly when the pictures do."""
    return [image.proto.imgs[0].url for image in app.get("image")]


def captions(app) -> list[str]:
    return [image.proto.imgs[0].caption for image in app.get("image")]


@pytest.mark.slow
def test_the_browser_shows_a_cells_metrics_as_its_evaluate_stage_wrote_them(in_study):
    app = app_on("browser")
    app.sidebar.selectbox(key="browse_study").set_value("tiny").run()
    app.sidebar.selectbox(key="browse_cell").set_value("linear-z2-b1-s0").run()
    shown = app.dataframe[0].value
    written = json.loads((in_study / "results/tiny/evaluate/linear-z2-b1-s0/metrics.json").read_text())
    assert dict(zip(shown["metric"], shown["value"])) == written
    # A planned cell without a trained model says which command trains it.
    app.sidebar.selectbox(key="browse_cell").set_value("conv-z2-b1-s0").run()
    assert "Cell conv-z2-b1-s0 has no trained model yet: run `dvc repro train@conv-z2-b1-s0`." in app.warning[0].value


@pytest.mark.slow
def test_the_browser_decodes_the_same_z_with_two_cells(in_study):
    app = app_on("browser")
    app.sidebar.selectbox(key="browse_cell").set_value("linear-z2-b1-s0").run()
    app.selectbox(key="browse_other").set_value("ae-linear-z2-s0").run()
    assert not app.exception
    assert [caption.value for caption in app.main.caption][-2:] == ["linear-z2-b1-s0", "ae-linear-z2-s0"]
    vae_row, ae_row = decoded_images(app)[-16:-8], decoded_images(app)[-8:]
    assert len(set(vae_row) | set(ae_row)) == 16  # 8 samples each, every picture different
    # The other cell alone changes nothing in the first row: both rows decode the same z.
    app.selectbox(key="browse_other").set_value("linear-z2-b1-s0").run()
    assert decoded_images(app)[-8:] == vae_row
    app.number_input(key="browse_seed").set_value(1).run()
    assert not set(decoded_images(app)[-8:]) & set(vae_row)


@pytest.mark.slow
def test_moving_the_latent_point_changes_the_decoded_digit(in_study):
    app = app_on("explorer")
    app.sidebar.selectbox(key="explore_cell").set_value("linear-z2-b1-s0").run()
    before = decoded_images(app)
    app.slider(key="plane_z1").set_value(2.5).run()
    after = decoded_images(app)
    assert not app.exception
    assert before[0] != after[0]  # the decoded digit
    assert "decoded at (2.50, 0.00)" in captions(app)


@pytest.mark.slow
def test_the_generator_alone_for_a_gan(in_study):
    app = app_on("explorer")
    app.sidebar.selectbox(key="explore_cell").set_value("gan-conv-z2-s0").run()
    assert not app.exception
    assert any("is a gan generator (no encoder)" in caption.value for caption in app.caption)
    before = decoded_images(app)
    app.slider(key="generator_z0_0").set_value(-2.0).run()
    assert decoded_images(app)[0] != before[0]


@pytest.mark.slow
def test_train_then_generate(own_study):
    import mlflow

    from pipeline.app import training

    app = app_on("train")
    app.selectbox(key="train_family").set_value("vae").run()
    app.number_input(key="train_epochs").set_value(2).run()
    app.number_input(key="train_size").set_value(500).run()
    app.checkbox(key="train_evaluate").check().run()
    app.button(key="train_button").click().run(timeout=TIMEOUT)
    assert not app.exception, app.exception
    request = training.Request("vae", "linear", 2, 2, 500, "beta: 1.0")
    name = request.cell_name
    assert app.success[0].value.startswith(f"Trained {name}")
    assert app.get("progress")[0].proto.value == 100  # the bar reached the last epoch
    snippet = f"{request.model_name}: {{family: vae, arch: linear, latent_dim: 2, epochs: 2, seed: 0, beta: 1.0}}"
    assert app.code[0].value == snippet
    # The pipeline's train stage wrote it, with its history, and logged it as a study cell.
    assert len(json.loads((own_study / f"results/app/train/{name}/history.json").read_text())) == 2
    runs = mlflow.search_runs(experiment_names=["vaebench-app"], filter_string=f"tags.mlflow.runName = '{name}'")
    assert list(runs["status"]) == ["FINISHED"] and runs["metrics.val_elbo"].notna().all()
    # Now in the explorer, and in the browser with the metrics its evaluate stage wrote.
    explorer = app_on("explorer")
    explorer.sidebar.selectbox(key="explore_study").set_value("app").run()
    explorer.sidebar.selectbox(key="explore_cell").set_value(name).run()
    assert not explorer.exception and not explorer.error and decoded_images(explorer)
    browser = app_on("browser")
    browser.sidebar.selectbox(key="browse_study").set_value("app").run()
    browser.sidebar.selectbox(key="browse_cell").set_value(name).run()
    shown = browser.dataframe[0].value
    written = json.loads((own_study / f"results/app/evaluate/{name}/metrics.json").read_text())
    assert dict(zip(shown["metric"], shown["value"])) == written


@pytest.mark.slow
def test_a_corrupt_model_file_is_one_line_with_its_fix(own_study):
    path = own_study / "results/tiny/train/linear-z2-b1-s0/model.pt"
    path.write_bytes(path.read_bytes()[:1000])
    app = app_on("explorer")
    app.sidebar.selectbox(key="explore_cell").set_value("linear-z2-b1-s0").run()
    assert not app.exception
    assert app.error[0].value.startswith("vaebench: error: ")
    assert "dvc repro -f train@linear-z2-b1-s0" in app.error[0].value


@pytest.mark.slow
def test_a_bad_setting_shows_the_command_lines_error_and_writes_nothing(own_study):
    app = app_on("train")
    app.selectbox(key="train_family").set_value("vae").run()
    app.text_area(key="train_settings_vae").set_value("beta: -1").run()
    app.button(key="train_button").click().run()
    shown = app.error[0].value
    # The command line's message for the same settings in a params file.
    from pipeline.app import training

    request = training.Request("vae", "linear", 2, 3, 5000, "beta: -1")
    bad = own_study / "bad.yaml"
    bad.write_text(training.study_text(request))
    check = subprocess.run(
        [sys.executable, "-m", "pipeline", "--params", str(bad), "check"], capture_output=True, text=True
    )
    assert check.returncode == 2
    assert shown == check.stderr.strip().splitlines()[-1]
    assert not (own_study / ".vaebench" / "app").exists() and not (own_study / "results" / "app").exists()


def test_a_request_while_another_training_runs_is_refused_and_changes_nothing(workdir):
    from pipeline.app import training
    from pipeline.errors import VaebenchError

    shutil.copyfile(TINY_STUDY, workdir / "params.yaml")
    running = training.Request("vae", "linear", 2, 2, 500, "beta: 1.0")
    workspace = training.WORKSPACE.resolve()
    with training.only_training(workspace):  # as the first request's training holds it
        training.prepare_workspace(workspace, training.study_text(running))
        before = {path: path.read_bytes() for path in workspace.rglob("*") if path.is_file()}
        with pytest.raises(VaebenchError, match="another training from the app is running"):
            training.train(training.Request("vae", "linear", 3, 2, 600, "beta: 2.0"), on_epoch=lambda row: None)
        assert {path: path.read_bytes() for path in workspace.rglob("*") if path.is_file()} == before


def test_cell_names_tell_settings_apart_and_the_page_keys_stay_the_pages():
    from pipeline.app import training
    from pipeline.config import ConfigError

    beta1, beta4 = (training.Request("vae", "linear", 2, 3, 5000, f"beta: {beta}") for beta in (1, 4))
    assert beta1.cell_name != beta4.cell_name and beta1.model_name != beta4.model_name
    assert beta1.cell_name == f"{beta1.model_name}-n5000-e3"
    with pytest.raises(ConfigError, match="the family settings set epochs, which the page's own field sets"):
        training.cell_spec(training.Request("vae", "linear", 2, 3, 5000, "epochs: 50"))
    with pytest.raises(ConfigError, match="must be key: value lines"):
        training.cell_spec(training.Request("vae", "linear", 2, 3, 5000, "- 1"))


def test_latent_arithmetic_against_closed_forms():
    from pipeline.app import latent

    # Codes spread 3 along (1, 1)/sqrt 2 and 1 along (1, -1)/sqrt 2 around (5, -5).
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(20_000, 2, generator=g) * torch.tensor([3.0, 1.0])
    rotation = torch.tensor([[1.0, 1.0], [1.0, -1.0]]) / 2**0.5
    codes = raw @ rotation + torch.tensor([5.0, -5.0])
    mean, directions, scales = latent.principal_axes(codes, 2)
    assert torch.allclose(mean, torch.tensor([5.0, -5.0]), atol=0.05)
    assert torch.allclose(directions[0].abs(), torch.tensor([1.0, 1.0]) / 2**0.5, atol=0.01)
    assert torch.allclose(scales, torch.tensor([3.0, 1.0]), rtol=0.02)
    point = latent.point_on_axes(mean, directions, scales, [1.0, 0.0])
    assert torch.allclose((point - mean).norm(), scales[0])
    line = latent.line_between(torch.tensor([0.0, 2.0]), torch.tensor([4.0, -2.0]), 5)
    assert torch.equal(line, torch.tensor([[0.0, 2.0], [1.0, 1.0], [2.0, 0.0], [3.0, -1.0], [4.0, -2.0]]))


@pytest.mark.slow
@pytest.mark.browser
def test_the_app_in_a_browser(own_study, tmp_path):
    """`streamlit run` on loopback, each page opened in headless Chromium: its text rendered, a screenshot."""
    from browser import STREAMLIT_BUSY, browser_page, screenshot_when_rendered, streamlit_app

    with streamlit_app(own_study, APP) as url, browser_page() as page:
        page.goto(f"{url}/?page=browser")
        screenshot_when_rendered(
            page,
            ["Study browser", "Test metrics", "Two cells decoding the same z"],
            tmp_path / "app-browser.png",
            gone=STREAMLIT_BUSY,
        )
        page.goto(f"{url}/?page=explorer")
        screenshot_when_rendered(
            page,
            ["Latent explorer", "The 2-D latent plane", "Interpolation between two test digits"],
            tmp_path / "app-explorer.png",
            gone=STREAMLIT_BUSY,
        )
        page.goto(f"{url}/?page=train")
        page.get_by_text("Train, then generate", exact=True).first.wait_for(timeout=30_000)
        for label, value in (("epochs", "2"), ("training images", "500")):
            field = page.get_by_label(label, exact=True)
            field.fill(value)
            field.press("Enter")
        page.wait_for_timeout(1_000)  # the re-run that reads the new values
        page.get_by_role("button", name="Train", exact=True).click()
        from pipeline.app import training

        name = training.Request("vae", "linear", 2, 2, 500, "beta: 1.0").cell_name
        trained = f"Trained {name}: open it in the Latent explorer (study app)."
        screenshot_when_rendered(
            page, [trained, "epoch 2/2"], tmp_path / "app-train.png", timeout_s=TIMEOUT, gone=STREAMLIT_BUSY
        )
    for name in ("app-browser", "app-explorer", "app-train"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000


def test_every_registered_family_is_in_the_train_form_once_and_its_starting_settings_make_a_study(tmp_path):
    """The form's family list is the registry's; each family's starting settings, as the settings box shows
    them, make a params.yaml that loads (a one-pass family trains for one epoch, on the MLP)."""
    from pipeline.app import training
    from pipeline.config import parse_study_text
    from pipeline.models import FAMILIES

    form = app_on("train").selectbox(key="train_family")
    assert form.options == list(FAMILIES)
    for family in FAMILIES:
        one_pass = FAMILIES[family].capabilities.one_pass
        request = training.Request(family, "linear", 2, 1 if one_pass else 3, 500, training.starting_settings(family))
        config = parse_study_text(training.study_text(request, TINY_STUDY), "app")
        assert config.cells[request.cell_name].family == family
