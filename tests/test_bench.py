import dataclasses
import json
import math

import pytest

from pipeline.bench import in_fresh_process, run_bench, table, training_step_flops, write_results
from pipeline.errors import VaebenchError


def test_flop_count_of_the_mlp_matches_the_layer_sizes(tiny_study):
    cell = dataclasses.replace(tiny_study.cell("linear-z2-b1-s0"), hidden=(400,), latent_dim=20)
    batch, h, d = 128, 400, 20
    forward = 2 * batch * (784 * h + h * 2 * d + d * h + h * 784)
    # Backward: weight and input gradients of every layer, but no input gradient for the images.
    assert training_step_flops(cell, batch) == 3 * forward - 2 * batch * 784 * h


def test_bench_writes_every_measurement(prepared, workdir):
    results = run_bench(prepared, ["linear-z2-b1-s0"], images=256, reference_cell="linear-z2-b1-s0", copies=2)
    row = results["architectures"][0]
    for key in ("engine_images_per_s", "standard_images_per_s", "compute_bound_images_per_s", "stacked_images_per_s"):
        assert row[key] > 0
    assert row["engine_over_standard"] == row["engine_images_per_s"] / row["standard_images_per_s"]
    assert all(value > 0 for value in row["peak_memory_mib"].values())
    full = results["full_training"]
    assert full["engine"]["test_elbo"] > 0 and full["standard"]["test_elbo"] > 0
    path = write_results(results)
    assert json.loads(path.read_text()) == json.loads(json.dumps(results))
    assert "linear-z2-b1-s0" in table(results)


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
