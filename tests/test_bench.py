import dataclasses
import json
import math

import pytest

from pipeline.bench import run_bench, table, write_results
from pipeline.bench.study import output_hashes, stage_seconds
from pipeline.bench.tables import spread, study_table
from pipeline.bench.throughput import in_fresh_process, training_step_flops
from pipeline.errors import VaebenchError


def test_flop_count_of_the_mlp_matches_the_layer_sizes(tiny_study):
    cell = dataclasses.replace(tiny_study.cell("linear-z2-b1-s0"), hidden=(400,), latent_dim=20)
    batch, h, d = 128, 400, 20
    forward = 2 * batch * (784 * h + h * 2 * d + d * h + h * 784)
    # Backward: weight and input gradients of every layer, but no input gradient for the images.
    assert training_step_flops(cell, batch) == 3 * forward - 2 * batch * 784 * h


@pytest.mark.slow
def test_bench_writes_every_measurement(prepared, workdir):
    from conftest import TINY_STUDY
    from pipeline.classifier import train_classifier

    train_classifier(prepared)  # the whole-process comparison runs the evaluate stage
    results = run_bench(
        prepared,
        ["linear-z2-b1-s0"],
        images=256,
        reference_cell="linear-z2-b1-s0",
        copies=2,
        runs=1,
        params_file=TINY_STUDY,
    )
    assert len(results["runs"]) == 1 and len(results["machine"]["matmul_gflops"]) == 1
    row = results["runs"][0]["architectures"][0]
    for key in ("engine_images_per_s", "standard_images_per_s", "compute_bound_images_per_s", "stacked_images_per_s"):
        assert row[key] > 0
    assert row["engine_over_standard"] == row["engine_images_per_s"] / row["standard_images_per_s"]
    assert all(value > 0 for value in row["peak_memory_mib"].values())
    whole = results["runs"][0]["whole_process"]
    assert whole["reference"]["test_elbo"] > 0 and whole["evaluate"]["test_elbo"] > 0
    assert whole["train_over_reference"] == whole["reference"]["seconds"] / whole["train"]["seconds"]
    assert not whole["same_network"]  # the tiny study's linear-z2 is not the 784-400-20 recipe
    # The stages' own timing reached their MLflow run, and accounts for no more than the whole process.
    assert set(whole["train"]["parts"]) == {"setup", "epochs", "write_outputs", "log_model"}
    assert {"load_model", "reconstruction", "classifier_features", "kid", "precision_recall", "iw_nll", "codes"} <= set(
        whole["evaluate"]["parts"]
    )
    assert 0 < sum(whole["train"]["parts"].values()) < whole["train"]["seconds"]
    assert 0 < sum(whole["evaluate"]["parts"].values()) < whole["evaluate"]["seconds"]
    path = write_results(results)
    assert json.loads(path.read_text()) == json.loads(json.dumps(results))
    printed = table(results)
    assert f"| linear-z2-b1-s0 | {row['engine_images_per_s']:.0f} | {row['standard_images_per_s']:.0f} |" in printed
    assert "`python -m pipeline train linear-z2-b1-s0`" in printed and "NOT the classic recipe's" in printed


def test_the_table_shows_the_median_and_range_of_the_runs():
    def run(engine: float, train_seconds: float) -> dict:
        row = {
            "cell": "c",
            "engine_images_per_s": engine,
            "standard_images_per_s": 100.0,
            "compute_bound_images_per_s": 200.0,
            "engine_over_standard": engine / 100,
            "engine_over_compute_bound": engine / 200,
            "engine_gflops": 1.0,
            "engine_share_of_matmul_peak": 0.5,
            "stacked_over_engine": 1.0,
            "stacked_copies": 2,
            "peak_memory_mib": {"engine": 10.0, "standard": 20.0, "compute_bound": 30.0},
        }
        whole = {
            "cell": "c",
            "same_network": True,
            "device": "cpu",
            "epochs": 2,
            "train_images": 1000,
            "reference": {"seconds": 10.0, "images_per_s": 200.0, "test_elbo": 100.0},
            "train": {
                "seconds": train_seconds,
                "images_per_s": 2000 / train_seconds,
                "import_seconds": 1.0,
                "parts": {"epochs": train_seconds - 1},
            },
            "evaluate": {"seconds": 5.0, "parts": {"kid": 2.0}, "test_elbo": 100.5},
            "train_over_reference": 10.0 / train_seconds,
            "test_elbo_difference": 0.5,
        }
        return {"architectures": [row], "whole_process": whole}

    results = {
        "machine": {"cpu_threads": 2, "cpu_capability": "AVX2", "matmul_gflops": [100.0, 200.0, 150.0]},
        "runs": [run(300.0, 5.0), run(100.0, 4.0), run(200.0, 8.0)],
    }
    printed = table(results)
    assert "3 run(s)" in printed and "matmul float32: 150 (100–200) GFLOP/s" in printed
    assert "| c | 200 (100–300) | 100 (100–100) |" in printed
    assert "| `python -m pipeline train c` | 5.0 (4.0–8.0) |" in printed
    assert "train over the classic recipe: 2.00 (1.25–2.50)×" in printed
    assert "train stage by part (s): epochs 4.0 (3.0–7.0)" in printed


def test_stage_seconds_splits_dvc_output_at_each_stage_announcement():
    lines = [
        (0.5, "Verifying data sources in stage: 'prepare'\n"),
        (1.0, "Running stage 'prepare':\n"),
        (1.1, "> python -m pipeline prepare\n"),
        (4.0, "Stage 'classifier' didn't change, skipping\n"),
        (4.5, "Stage 'train@a' is cached - skipping run, checking out outputs\n"),
        (5.0, "Running stage 'evaluate@a':\n"),
        (9.0, "Updating lock file 'dvc.lock'\n"),
    ]
    assert stage_seconds(lines, 12.0) == {
        "(dvc start-up)": 1.0,
        "prepare": 3.0,
        "classifier": 0.5,
        "train@a": 0.5,
        "evaluate@a": 7.0,
    }


def test_output_hashes_leave_out_reports_and_run_ids():
    lock = {
        "stages": {
            "train@a": {
                "outs": [
                    {"path": "results/s/train/a/model.pt", "md5": "1"},
                    {"path": "results/s/train/a/mlflow_run.json", "md5": "2"},
                ]
            },
            "report": {"outs": [{"path": "reports/s", "md5": "3.dir"}, {"path": "results/s/metrics.json", "md5": "4"}]},
        }
    }
    assert output_hashes(lock) == {"results/s/train/a/model.pt": "1", "results/s/metrics.json": "4"}


def test_stopwatch_adds_up_the_time_of_a_part(monkeypatch):
    from types import SimpleNamespace

    from pipeline import timing

    clock = iter([0.0, 1.0, 10.0, 12.0, 20.0, 23.5])  # perf_counter at each start and end, in order
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    stopwatch = timing.Stopwatch()
    for _ in range(2):
        with stopwatch.part("sleep"):
            pass
    with pytest.raises(ValueError), stopwatch.part("failing"):
        raise ValueError
    assert stopwatch.seconds == {"sleep": 3.0, "failing": 3.5}


def test_spread_is_the_median_and_range():
    assert spread([3.0, 1.0, 2.0]) == "2 (1–3)"
    assert spread([1.0, 2.0, 4.0, 10.0], digits=1) == "3.0 (1.0–10.0)"
    assert spread([0.25], digits=0, scale=100) == "25"


def test_study_table_names_each_stage_and_the_lock_comparison():
    study = {
        "seconds": 600.0,
        "commit": "0123456789",
        "cells": 1,
        "outputs_compared": 3,
        "outputs_differing": [],
        "stages": {"prepare": 10.0, "train@a": 100.0, "evaluate@a": 50.0},
        "cell_parts": {
            "a": {
                "train": {"epochs": 90.0, "log_model": 2.0},
                "evaluate": {"kid": 5.0, "iw_nll": 20.0, "codes": 1.0, "fid": 0.1},
            }
        },
    }
    printed = study_table(study)
    assert "10.0 min; 3 outputs compared, every output has the committed dvc.lock's md5" in printed
    assert "| train@a | 100.0 | 90.0 / 2.0 |  |" in printed
    assert "| evaluate@a | 50.0 |  | iw_nll 20.0, kid 5.0, codes 1.0 |" in printed
    study["outputs_differing"] = ["results/default/evaluate/a/metrics.json"]
    assert "1 outputs differ from the committed dvc.lock: results/default/evaluate/a/metrics.json" in study_table(study)


def test_cells_the_bench_cannot_measure_are_refused_before_any_measurement(tiny_study):
    from pipeline.bench import check_bench_cells
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="cell cae-conv-z2-s0: its cae penalty differentiates through the input"):
        check_bench_cells(tiny_study, ["linear-z2-b1-s0", "cae-conv-z2-s0"], None)
    with pytest.raises(
        ConfigError, match="--reference-cell ae-linear-z2-s0: the full-training comparison reads the test ELBO"
    ):
        check_bench_cells(tiny_study, ["ae-linear-z2-s0"], "ae-linear-z2-s0")
    with pytest.raises(ConfigError, match="cell gan-conv-z2-s0: family gan trains with a step of its own"):
        check_bench_cells(tiny_study, ["gan-conv-z2-s0"], None)
    with pytest.raises(ConfigError, match="cell vaegan-linear-z2-s0: family vaegan trains with a step of its own"):
        check_bench_cells(tiny_study, ["linear-z2-b1-s0"], "vaegan-linear-z2-s0")
    with pytest.raises(ConfigError, match="cell vqvae-linear-z2-s0: family vqvae trains with a step of its own"):
        check_bench_cells(tiny_study, ["vqvae-linear-z2-s0"], None)
    with pytest.raises(ConfigError, match="cell pca-z2-s0: family pca is fitted in closed form"):
        check_bench_cells(tiny_study, ["pca-z2-s0"], None)
    check_bench_cells(tiny_study, ["ae-linear-z2-s0", "dae-linear-z2-s0"], "linear-z2-b1-s0")


def test_a_measurement_process_that_dies_raises_instead_of_hanging():
    with pytest.raises(VaebenchError, match="the benchmark process for sqrt exited with code 1 without a result"):
        in_fresh_process(math.sqrt, -1.0)
