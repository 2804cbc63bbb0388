import dataclasses
import json

from pipeline.bench import run_bench, table, training_step_flops, write_results


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
