import dataclasses
import json
import math

import pytest

from pipeline.bench import in_fresh_process, run_bench, spread, study_table, table, training_step_flops, write_results
from pipeline.errors import VaebenchError


def test_flop_count_of_the_mlp_matches_the_layer_sizes(tiny_study):
    cell = dataclasses.replace(tiny_study.cell("linear-z2-b1-s0"), hidden=(400,), latent_dim=20)
    batch, h, d = 128, 400, 20
    forward = 2 * batch * (784 * h + h * 2 * d + d * h + h * 784)
    # Backward: weight and input gradients of every layer, but no input gradient for the images.
    assert training_step_flops(cell, batch) == 3 * forward - 2 * batch * 784 * h


def test_bench_writes_every_measurement(prepared, workdir):
    from pipeline.classifier import train_classifier

    from conftest import TINY_STUDY

    train_classifier(prepared)  # the whole-process comparison runs the evaluate stage
    results = run_bench(prepared, ["linear-z2-b1-s0"], images=256, reference_cell="linear-z2-b1-s0", copies=2,
                        runs=2, params_file=TINY_STUDY)
    assert len(results["runs"]) == 2 and len(results["machine"]["matmul_gflops"]) == 2
    for run in results["runs"]:
        row = run["architectures"][0]
        for key in ("engine_images_per_s", "standard_images_per_s", "compute_bound_images_per_s", "stacked_images_per_s"):
            assert row[key] > 0
        assert row["engine_over_standard"] == row["engine_images_per_s"] / row["standard_images_per_s"]
        assert all(value > 0 for value in row["peak_memory_mib"].values())
        whole = run["whole_process"]
        assert whole["reference"]["test_elbo"] > 0 and whole["evaluate"]["test_elbo"] > 0
        assert whole["train_over_reference"] == whole["reference"]["seconds"] / whole["train"]["seconds"]
        # The stages' own timing reached their MLflow run, and accounts for no more than the whole process.
        assert set(whole["train"]["parts"]) == {"setup", "epochs", "write_outputs", "log_model"}
        assert {"load_model", "reconstruction", "classifier_features", "kid", "precision_recall", "iw_nll", "codes"} <= set(
            whole["evaluate"]["parts"])
        assert 0 < sum(whole["train"]["parts"].values()) < whole["train"]["seconds"]
        assert 0 < sum(whole["evaluate"]["parts"].values()) < whole["evaluate"]["seconds"]
    path = write_results(results)
    assert json.loads(path.read_text()) == json.loads(json.dumps(results))
    printed = table(results)
    engines = sorted(run["architectures"][0]["engine_images_per_s"] for run in results["runs"])
    assert f"| linear-z2-b1-s0 | {sum(engines) / 2:.0f} ({engines[0]:.0f}–{engines[1]:.0f}) |" in printed
    assert "`python -m pipeline train linear-z2-b1-s0`" in printed


def test_spread_is_the_median_and_range():
    assert spread([3.0, 1.0, 2.0]) == "2 (1–3)"
    assert spread([1.0, 2.0, 4.0, 10.0], digits=1) == "3.0 (1.0–10.0)"
    assert spread([0.25], digits=0, scale=100) == "25"


def test_study_table_names_each_stage_and_the_lock_comparison():
    study = {
        "seconds": 600.0, "commit": "0123456789", "cells": 1, "outputs_compared": 3, "outputs_differing": [],
        "stages": {"prepare": 10.0, "train@a": 100.0, "evaluate@a": 50.0},
        "cell_parts": {"a": {"train": {"epochs": 90.0, "log_model": 2.0}, "evaluate": {"kid": 5.0, "iw_nll": 20.0, "codes": 1.0, "fid": 0.1}}},
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
    with pytest.raises(ConfigError, match="--reference-cell ae-linear-z2-s0: the full-training comparison reads the test ELBO"):
        check_bench_cells(tiny_study, ["ae-linear-z2-s0"], "ae-linear-z2-s0")
    with pytest.raises(ConfigError, match="cell gan-conv-z2-s0: family gan trains with alternating player steps"):
        check_bench_cells(tiny_study, ["gan-conv-z2-s0"], None)
    with pytest.raises(ConfigError, match="cell vaegan-linear-z2-s0: family vaegan trains with alternating"):
        check_bench_cells(tiny_study, ["linear-z2-b1-s0"], "vaegan-linear-z2-s0")
    check_bench_cells(tiny_study, ["ae-linear-z2-s0", "dae-linear-z2-s0"], "linear-z2-b1-s0")


def test_a_measurement_process_that_dies_raises_instead_of_hanging():
    with pytest.raises(VaebenchError, match="the benchmark process for sqrt exited with code 1 without a result"):
        in_fresh_process(math.sqrt, -1.0)
