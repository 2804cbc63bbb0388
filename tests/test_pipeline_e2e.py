"""`dvc repro` of the tiny study in a temporary copy of the repository, checked through DVC and MLflow."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

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


def test_editing_cells_reruns_only_those_cells_and_the_cells_fine_tuned_from_them(repo, reproduced, tmp_path):
    # Its own copy of the reproduced repository (the other tests keep theirs unedited), which also checks
    # that a copied checkout logs only into itself.
    source_artifacts = repo / "mlartifacts"
    before = sorted(source_artifacts.rglob("*"))
    repo = Path(shutil.copytree(repo, tmp_path / "copy", symlinks=True))
    params = repo / "params.yaml"
    text = params.read_text()
    for cell, spec in (("conv-z2-b1-s0", "{arch: conv, latent_dim: 2, beta: %s, seed: 0}"),
                       ("linear-z2-b1-s0", "{arch: linear, latent_dim: 2, beta: %s, seed: 0}")):
        text = text.replace(f"{cell}: {spec % '1.0'}", f"{cell}: {spec % '0.5'}")
    params.write_text(text)
    output = run(repo, "dvc", "repro")
    for stage in ("train@conv-z2-b1-s0", "evaluate@conv-z2-b1-s0", "train@linear-z2-b1-s0",
                  # retraining a VAE cell re-runs the GAN fine-tuned from it
                  "finetune@gan-linear-z2-ft-s0", "evaluate-finetuned@gan-linear-z2-ft-s0"):
        assert f"Running stage '{stage}'" in output
    for stage in ("train@ae-linear-z2-s0", "train@gan-conv-z2-s0", "train@vaegan-linear-z2-s0"):
        assert f"Running stage '{stage}'" not in output
    assert "Running stage 'prepare'" not in output and "Running stage 'classifier'" not in output
    assert "up to date" in run(repo, "dvc", "status")
    assert sorted(source_artifacts.rglob("*")) == before
    assert len(list((repo / "mlartifacts").rglob("model/state_dict.pt"))) > len(list(source_artifacts.rglob("model/state_dict.pt")))
