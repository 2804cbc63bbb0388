"""`dvc repro` of the tiny study in a temporary copy of the repository, checked through DVC and MLflow."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from browser import browser_page, mlflow_ui, screenshot_when_rendered
from conftest import SHARED_DATA, TINY_STUDY, copy_repo

VAE_CELLS = ["linear-z2-b1-s0", "conv-z2-b1-s0"]
ENCODER_CELLS = [*VAE_CELLS, "ae-linear-z2-s0", "dae-linear-z2-s0", "cae-conv-z2-s0", "vaegan-linear-z2-s0"]
BOUND_CELLS = [*VAE_CELLS, "vaegan-linear-z2-s0"]
GAN_CELLS = ["gan-conv-z2-s0", "gan-linear-z2-ft-s0"]
CELLS = [*ENCODER_CELLS, *GAN_CELLS]
ADVERSARIAL_CURVES = ["train_d_loss", "train_g_loss", "val_d_real", "val_d_fake", "val_fid_probe"]
SAMPLE_SCORES = ["fid_mnist_cnn", "kid_mnist_cnn_mean", "is_mnist_cnn", "precision_mnist_cnn", "recall_mnist_cnn"]
EVERY_FAMILY = ["recon", "recon_bernoulli", "recon_mse", "noisy_recon_mse", "masked_recon_mse", "contraction",
                "probe_accuracy", "knn_accuracy", *SAMPLE_SCORES]
BOUND_ONLY = ["kl", "elbo", "active_units", "iw_nll"]
# The VAE cells' test metrics computed by the code before the model-families refactor (see the file's _source).
BEFORE_REFACTOR = json.loads((Path(__file__).parent / "reference" / "tiny_vae_metrics_before_families.json").read_text())


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("repo"), TINY_STUDY)


def run(repo, *command):
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "VAEBENCH_DATA_ROOT": str(SHARED_DATA),
        "DVC_NO_ANALYTICS": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def mlflow_client(repo):
    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def study_runs(repo):
    client = mlflow_client(repo)
    experiment = client.get_experiment_by_name("vaebench-tiny")
    return client.search_runs([experiment.experiment_id])


@pytest.fixture(scope="module")
def reproduced(repo):
    return run(repo, "dvc", "repro")


def test_repro_writes_every_stage_output(repo, reproduced):
    assert (repo / "results/prepare/mnist.npz").is_file()
    for cell in CELLS:
        assert (repo / f"results/tiny/train/{cell}/model.pt").is_file()
        history = json.loads((repo / f"results/tiny/train/{cell}/history.json").read_text())
        assert [row["epoch"] for row in history] == [1]
        metrics = json.loads((repo / f"results/tiny/evaluate/{cell}/metrics.json").read_text())
        assert set(SAMPLE_SCORES) <= set(metrics)
        if cell in GAN_CELLS:  # no encoder: samples only, "–" in the tables
            assert not (set(EVERY_FAMILY) - set(SAMPLE_SCORES)) & set(metrics)
            assert set(ADVERSARIAL_CURVES) <= set(history[0])
            continue
        assert set(EVERY_FAMILY) <= set(metrics)
        assert 0 <= metrics["probe_accuracy"] <= 1 and 0 <= metrics["knn_accuracy"] <= 1
        assert metrics["contraction"] > 0 and metrics["recon_mse"] > 0
        kl_dims = json.loads((repo / f"results/tiny/evaluate/{cell}/kl_per_dim.json").read_text())
        if cell not in BOUND_CELLS:
            assert not set(BOUND_ONLY) & set(metrics) and kl_dims is None
            continue
        assert metrics["recon_bernoulli"] == metrics["recon"]  # the VAE cells are Bernoulli
        assert metrics["elbo"] == pytest.approx(metrics["recon"] + metrics["kl"])
        assert metrics["iw_nll"] <= metrics["elbo"] + 1.0  # the IW bound is tighter up to Monte-Carlo noise
        assert 0 <= metrics["active_units"] <= 2
        assert len(kl_dims) == 2
        for image in ("reconstructions.png", "samples.png"):
            assert (repo / f"results/tiny/evaluate/{cell}/images/{image}").stat().st_size > 0
    report = (repo / "reports/tiny/report.md").read_text()
    assert all(f"| {cell} |" in report for cell in CELLS)
    for heading in ("Does adversarial training make samples more realistic", "Does starting from the VAE's decoder help",
                    "Does any generator collapse", "The decoder as a generator", "Digits in the samples"):
        assert heading in report
    assert "vae (β=1) → gan (R1 γ=1, from linear-z2-b1): precision" in report
    for figure in ("adversarial_curves.png", "finetuning.png", "latent_map.png"):
        assert (repo / "reports/tiny" / figure).stat().st_size > 0
    assert (repo / "reports/tiny/report.html").stat().st_size > 0


def test_vae_cells_give_the_test_metrics_of_the_code_before_the_refactor(repo, reproduced):
    for cell in VAE_CELLS:
        metrics = json.loads((repo / f"results/tiny/evaluate/{cell}/metrics.json").read_text())
        before = BEFORE_REFACTOR[cell]
        assert {"elbo", "iw_nll", "fid_mnist_cnn"} <= set(before)
        assert {key: metrics[key] for key in before} == pytest.approx(before, rel=1e-4, abs=1e-6), cell


def test_dvc_knows_that_the_fine_tuned_generator_depends_on_its_vae(repo, reproduced):
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    deps = [dep["path"] for dep in lock["finetune@gan-linear-z2-ft-s0"]["deps"]]
    assert "results/tiny/train/linear-z2-b1-s0" in deps
    assert '"train@linear-z2-b1-s0" -> "finetune@gan-linear-z2-ft-s0"' in run(repo, "dvc", "dag", "--dot")


def test_dvc_is_up_to_date_and_lists_every_cell_metric(repo, reproduced):
    assert "up to date" in run(repo, "dvc", "status")
    shown = json.loads(run(repo, "dvc", "metrics", "show", "--json"))
    files = next(iter(shown.values()))["data"]
    for cell in CELLS:
        expected = SAMPLE_SCORES if cell in GAN_CELLS else EVERY_FAMILY
        assert set(expected) <= set(files[f"results/tiny/evaluate/{cell}/metrics.json"]["data"])
    assert "test_accuracy" in files["results/classifier/metrics.json"]["data"]


def test_mlflow_has_one_parent_and_a_child_per_cell(repo, reproduced):
    runs = study_runs(repo)
    parents = [r for r in runs if r.data.tags.get("vaebench.role") == "study"]
    children = [r for r in runs if r.data.tags.get("vaebench.role") == "cell"]
    assert len(parents) == 1 and parents[0].info.run_name == "tiny"
    assert sorted(r.info.run_name for r in children) == sorted(CELLS)
    client = mlflow_client(repo)
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        name = child.info.run_name
        fine_tuned = name.endswith("-ft-s0")
        stages = {"finetune@" + name, "evaluate-finetuned@" + name} if fine_tuned else {"train@" + name, "evaluate@" + name}
        assert child.data.tags["vaebench.dvc_stage"] in stages
        expected = SAMPLE_SCORES if name in GAN_CELLS else EVERY_FAMILY
        assert {f"test_{metric}" for metric in expected} <= set(child.data.metrics)
        has_bound = name in BOUND_CELLS
        assert ({f"test_{metric}" for metric in BOUND_ONLY} <= set(child.data.metrics)) == has_bound
        expected_family = "vae" if name in VAE_CELLS else name.split("-")[0]
        assert child.data.params["cell.family"] == expected_family
        assert child.data.params.get("cell.init_from") == ("linear-z2-b1-s0" if fine_tuned else None)
        assert [m.step for m in client.get_metric_history(child.info.run_id, "train_loss")] == [1]
        images = ["images/samples.png"] if name in GAN_CELLS else ["images/reconstructions.png", "images/samples.png"]
        assert [a.path for a in client.list_artifacts(child.info.run_id, "images")] == images
        assert sorted(a.path for a in client.list_artifacts(child.info.run_id, "model")) == ["model/cell.json", "model/state_dict.pt"]


def test_second_repro_runs_nothing_and_logs_no_duplicate_run(repo, reproduced):
    before = len(study_runs(repo))
    output = run(repo, "dvc", "repro")
    assert "Running stage" not in output
    assert len(study_runs(repo)) == before


def test_dvc_plots_show_draws_the_curves_from_every_cell_history(repo, reproduced, tmp_path):
    run(repo, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    page = (tmp_path / "plots" / "index.html").read_text()
    for cell in CELLS:  # each cell's validation loss per epoch, read from its history.json
        history = json.loads((repo / f"results/tiny/train/{cell}/history.json").read_text())
        assert f"validation loss per epoch of {cell}" in page
        assert f'"val_loss": {json.dumps(history[0]["val_loss"])}' in page
    # the report's loss curves as an image, which the page shows without the network
    assert (tmp_path / "plots" / "static" / "workspace_reports_tiny_loss_curves.png").stat().st_size > 0


def test_the_study_metrics_are_committed_with_git_and_list_every_cell(repo, reproduced):
    committed = json.loads((repo / "results/tiny/metrics.json").read_text())
    assert committed == {cell: json.loads((repo / f"results/tiny/evaluate/{cell}/metrics.json").read_text()) for cell in CELLS}
    assert run(repo, "git", "status", "--porcelain", "--untracked-files=all", "results").splitlines() == ["?? results/tiny/metrics.json"]
    shown = json.loads(run(repo, "dvc", "metrics", "show", "--json"))
    assert next(iter(shown.values()))["data"]["results/tiny/metrics.json"]["data"] == committed


def test_dvc_exp_run_of_one_cell_reruns_it_and_its_fine_tuned_cells_and_logs_to_the_repository_store(repo, reproduced, tmp_path):
    # Its own copy of the reproduced repository (the other tests keep theirs unedited), which also checks
    # that a copied checkout logs only into itself.
    source_artifacts = repo / "mlartifacts"
    before = sorted(source_artifacts.rglob("*"))
    repo = Path(shutil.copytree(repo, tmp_path / "copy", symlinks=True))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    run(repo, *git, "add", "-A")
    run(repo, *git, "commit", "-q", "-m", "the tiny study")
    runs_before = {r.info.run_id for r in study_runs(repo)}

    # In a temporary workspace under .dvc/tmp/exps, which DVC throws away afterwards.
    output = run(repo, "dvc", "exp", "run", "--temp", "-n", "beta05", "-S", "cells.linear-z2-b1-s0.beta=0.5")
    ran = sorted(line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage"))
    # the edited VAE cell, the GAN fine-tuned from it and the report; nothing else
    assert ran == ["evaluate-finetuned@gan-linear-z2-ft-s0", "evaluate@linear-z2-b1-s0", "finetune@gan-linear-z2-ft-s0",
                   "report", "train@linear-z2-b1-s0"]
    new = [r for r in study_runs(repo) if r.info.run_id not in runs_before]
    assert sorted((r.info.run_name, r.info.status) for r in new) == [("gan-linear-z2-ft-s0", "FINISHED"),
                                                                      ("linear-z2-b1-s0", "FINISHED")]
    assert next(r for r in new if r.info.run_name == "linear-z2-b1-s0").data.params["cell.beta"] == "0.5"
    assert sorted(source_artifacts.rglob("*")) == before

    diff = json.loads(run(repo, "dvc", "metrics", "diff", "HEAD", "beta05", "--json"))["results/tiny/metrics.json"]
    assert {key.split(".")[0] for key in diff} == {"linear-z2-b1-s0", "gan-linear-z2-ft-s0"}, diff
    assert diff["linear-z2-b1-s0.kl"]["old"] != diff["linear-z2-b1-s0.kl"]["new"]
    shown = json.loads(run(repo, "dvc", "exp", "show", "--json"))
    experiments = [exp for baseline in shown for exp in baseline.get("experiments") or []]
    assert any(exp.get("name") == "beta05" for exp in experiments)


def test_logged_decoder_loads_and_decodes_in_a_process_without_the_package(repo, reproduced, tmp_path, monkeypatch):
    import torch

    from pipeline.tracking import load_logged_model

    cell = "linear-z2-b1-s0"
    run_id = json.loads((repo / f"results/tiny/train/{cell}/mlflow_run.json").read_text())["run_id"]
    client = mlflow_client(repo)
    experiment = client.get_experiment_by_name("vaebench-tiny").experiment_id
    models = {m.name: m for m in client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")}
    assert set(models) == {"decoder", "encoder"}
    assert {"test_elbo", "test_fid_mnist_cnn"} <= {m.key for m in models["decoder"].metrics}  # metrics linked to the model
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    torch.save(z, tmp_path / "z.pt")
    script = f"""
import importlib.abc, sys
class NoPipeline(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "pipeline":
            raise ImportError("this process must not import " + name)
sys.meta_path.insert(0, NoPipeline())
import mlflow, torch
mlflow.set_tracking_uri({f"sqlite:///{repo / 'mlflow.db'}"!r})
decoder = mlflow.pytorch.load_model("models:/{models['decoder'].model_id}")
torch.save(decoder(torch.load({str(tmp_path / 'z.pt')!r})), {str(tmp_path / 'images.pt')!r})
print(mlflow.models.get_model_info("models:/{models['decoder'].model_id}").signature.inputs.to_dict())
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "(-1, 2)" in result.stdout  # the signature: a batch of 2-D codes
    images = torch.load(tmp_path / "images.pt", weights_only=True)
    # the same run's weights rebuilt by this package (its model/ artifact), decoding the same z
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    model = load_logged_model(run_id)
    assert images.shape == (5, 1, 28, 28)
    assert torch.allclose(images, torch.sigmoid(model.decode(z)), atol=1e-6)


def test_registry_aliases_name_the_best_cells_and_the_parent_run_holds_the_study_numbers(repo, reproduced):
    client = mlflow_client(repo)
    metrics = {cell: json.loads((repo / f"results/tiny/evaluate/{cell}/metrics.json").read_text()) for cell in CELLS}
    scored = lambda key: {cell: m[key] for cell, m in metrics.items() if key in m}  # noqa: E731
    # elbo is the negative bound (recon + KL, nats/image): lower is better, as for the other two
    expected = {alias: min(scored(key).items(), key=lambda kv: kv[1])
                for alias, key in (("best-elbo", "elbo"), ("best-nll", "iw_nll"), ("best-fid", "fid_mnist_cnn"))}
    for alias, (cell, _) in expected.items():
        version = client.get_model_version_by_alias("vaebench-tiny-decoder", alias)
        assert version.tags["vaebench.cell"] == cell, alias
        run_id = json.loads((repo / f"results/tiny/train/{cell}/mlflow_run.json").read_text())["run_id"]
        assert version.run_id == run_id
    runs = study_runs(repo)
    parent = next(r for r in runs if r.data.tags.get("vaebench.role") == "study")
    assert parent.data.metrics["cells_evaluated"] == len(CELLS)
    assert parent.data.metrics["best_elbo"] == pytest.approx(expected["best-elbo"][1])
    assert parent.data.tags["vaebench.best_fid_mnist_cnn"] == expected["best-fid"][0]
    # its duration spans the study: it ends after every cell's run, not the moment it was created
    assert parent.info.end_time >= max(r.info.end_time for r in runs if r.data.tags.get("vaebench.role") == "cell")
    assert any(a.path == "report/report.md" for a in client.list_artifacts(parent.info.run_id, "report"))


def test_cell_runs_carry_their_group_and_the_prepared_data_set(repo, reproduced):
    prepared = json.loads((repo / "results/prepare/summary.json").read_text())
    for child in (r for r in study_runs(repo) if r.data.tags.get("vaebench.role") == "cell"):
        assert child.data.tags["vaebench.group"] == child.info.run_name.removesuffix("-s0")
        (data_input,) = child.inputs.dataset_inputs
        assert data_input.dataset.name == "mnist-500-100-200"
        assert [(tag.key, tag.value) for tag in data_input.tags] == [("mlflow.data.context", "training")]
        assert data_input.dataset.digest == hashlib.sha256(json.dumps(prepared, sort_keys=True).encode()).hexdigest()[:16]
        assert child.data.params["data.train_size"] == "500" and child.data.params["evaluate.n_images"] == "16"


def test_mlflow_ui_shows_the_study_and_the_registry(repo, reproduced, tmp_path):
    """The real MLflow UI over the study's store, in headless Chromium: the study's run with every cell's run
    under it, and the registry page with the best-elbo alias on its version."""
    from playwright.sync_api import expect

    model_name, alias = "vaebench-tiny-decoder", "best-elbo"
    client = mlflow_client(repo)
    experiment_id = client.get_experiment_by_name("vaebench-tiny").experiment_id
    version = client.get_model_version_by_alias(model_name, alias).version
    with mlflow_ui(repo) as url, browser_page() as page:
        page.goto(f"{url}/#/experiments/{experiment_id}/runs")
        # The runs table (ag-grid) gives each run a role=row element; the study's row is the one holding the
        # link named exactly "tiny". Its only button is the nesting expander (an icon button with no label:
        # hide and pin are checkbox inputs in labels, not buttons).
        parent_row = page.get_by_role("row").filter(has=page.get_by_role("link", name="tiny", exact=True))
        expect(parent_row).to_have_count(1, timeout=30_000)
        # The cells hang under the study's run: collapsed, none of them is a row of its own yet.
        expect(page.get_by_role("link", name=CELLS[0], exact=True)).to_have_count(0)
        parent_row.get_by_role("button").click()
        screenshot_when_rendered(page, ["tiny", *CELLS], tmp_path / "mlflow_experiment.png")

        page.goto(f"{url}/#/models/{urllib.parse.quote(model_name)}")
        # The versions table: the row of the aliased version shows the alias as a tag "@ best-elbo".
        version_row = page.get_by_role("row").filter(has=page.get_by_role("link", name=f"Version {version}", exact=True))
        expect(version_row).to_contain_text(f"@ {alias}", timeout=30_000)
        screenshot_when_rendered(page, [model_name, f"Version {version}"], tmp_path / "mlflow_registry.png")
