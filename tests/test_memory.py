"""The memory estimate of a cell (built on the meta device, nothing allocated), the memory limit of the process
(physical memory and cgroups), the check that refuses a cell beyond it, and recognising allocation failures."""

import os
import time

import pytest
import torch

from pipeline import memory
from pipeline.config import ConfigError, parse_cell
from pipeline.models import build_model
from test_models import CONTRACT_CELLS, LATENT_DIMS, SETTINGS  # every family's small cells

DEFAULTS = {
    "epochs": 1,
    "batch_size": 128,
    "lr": 1e-3,
    "likelihood": "bernoulli",
    "gaussian_std": 0.1,
    "hidden": [400],
    "channels": [32, 64],
    "device": "cpu",
}
GiB = 2**30


def cell(family="vae", arch="linear", latent_dim=10, **changes):
    spec = {"family": family, "arch": arch, "latent_dim": latent_dim, "seed": 0, **SETTINGS[family], **changes}
    return parse_cell(f"{family}-{arch}", spec, DEFAULTS)


@pytest.mark.parametrize(("family", "arch"), CONTRACT_CELLS)
def test_parameters_counted_on_meta_equal_the_real_model(family, arch):
    small = cell(family, arch, latent_dim=LATENT_DIMS.get((family, arch), 3), hidden=[16, 8], channels=[4, 8])
    real = build_model(small)
    weights = sum(p.numel() for p in real.parameters()) * 4
    estimate = memory.estimate_training(small, train_images=100)
    assert estimate.parameters == weights + sum(b.numel() * b.element_size() for b in real.buffers())
    assert estimate.gradients == weights
    assert estimate.optimizer == memory.OPTIMIZER_COPIES * weights
    assert estimate.data == 100 * 784 * 4


def test_estimate_grows_with_batch_size_hidden_and_images():
    base = memory.estimate_training(cell(), train_images=1000)
    assert memory.estimate_training(cell(batch_size=4096), train_images=1000).activations > base.activations
    wider = memory.estimate_training(cell(hidden=[800]), train_images=1000)
    assert wider.parameters > base.parameters and wider.activations > base.activations
    assert memory.estimate_training_bytes(cell(), 2000) > memory.estimate_training_bytes(cell(), 1000)
    assert memory.estimate_training_bytes(cell(), 1000, val_images=500) == base.total + 500 * 784 * 4


@pytest.mark.parametrize("family", ["vae", "gan", "vaegan"])
def test_activations_of_a_conv_cell_cover_each_network(family):
    # One conv layer of 32 channels at 14x14 per image already takes 25 KB; the estimate counts at least
    # the encoder's and the decoder's (or discriminator's) first layers for a batch.
    estimate = memory.estimate_training(cell(family, "conv", batch_size=512), train_images=0)
    assert estimate.activations >= memory.TRAINING_ACTIVATION_FACTOR * 512 * 2 * 32 * 14 * 14 * 4


@pytest.mark.parametrize(
    "changes",
    [{"latent_dim": 100_000_000}, {"hidden": [2_000_000]}, {"arch": "conv", "channels": [100_000, 100_000]}],
)
def test_a_huge_cell_is_refused_without_allocating(changes):
    huge = cell(**changes)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as refused:
        memory.check_memory(huge, train_images=55_000, device=torch.device("cpu"))
    message = str(refused.value)
    assert time.perf_counter() - started < 5  # the meta build: no 100 GB tensors were filled in
    estimate = memory.estimate_training(huge, 55_000)
    limit = memory.available_bytes(torch.device("cpu"))
    part, size = estimate.largest()
    assert "\n" not in message and message.startswith(f"cell {huge.name}: ")
    assert memory._gib(estimate.total) in message and f"{part} {memory._gib(size)}" in message
    assert memory._gib(limit) in message and "lower latent_dim/hidden/channels/batch_size" in message


def test_the_finding_cell_needs_more_than_any_machine_holds():
    estimate = memory.estimate_training(cell(latent_dim=100_000_000), 55_000)
    assert estimate.total > 1000 * GiB
    assert estimate.largest()[0] == "optimizer"  # Adam's state: three copies of the weights


def test_default_cells_pass_and_a_big_batch_is_refused_under_a_small_limit(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * GiB)
    for family, arch in CONTRACT_CELLS:
        default = cell(family, arch, latent_dim=LATENT_DIMS.get((family, arch), 10))
        memory.check_memory(default, train_images=55_000, device=torch.device("cpu"), val_images=5000)
    with pytest.raises(ConfigError, match=r"activations .* GiB\), more than 90% of the 2\.0 GiB"):
        memory.check_memory(cell("vae", "conv", batch_size=20_000), train_images=1000, device=torch.device("cpu"))


def test_default_cell_passes_on_this_machine():
    memory.check_memory(cell("vaegan", "conv"), train_images=55_000, device=torch.device("cpu"), val_images=5000)


def physical_bytes():
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_available_bytes_respects_a_cgroup_v2_limit(tmp_path):
    root, own = tmp_path / "cgroup", tmp_path / "self"
    write(own, "0::/\n")
    write(root / "memory.max", f"{GiB}\n")
    assert memory.available_bytes(torch.device("cpu"), root, own) == min(GiB, physical_bytes())
    write(root / "memory.max", "max\n")
    unlimited = memory.available_bytes(torch.device("cpu"), root, own)
    assert unlimited > 0 and memory.cgroup_limits(root, own) == []


def test_available_bytes_takes_the_smallest_limit_up_the_cgroup_tree(tmp_path):
    root, own = tmp_path / "cgroup", tmp_path / "self"
    write(own, "0::/user.slice/job\n")
    write(root / "user.slice" / "job" / "memory.max", "max\n")
    write(root / "user.slice" / "memory.max", f"{3 * GiB}\n")
    assert memory.cgroup_limits(root, own) == [3 * GiB]
    # A container sees its own cgroup at the mount, not under the path /proc/self/cgroup names.
    write(own, "0::/docker/abc\n")
    write(root / "memory.max", f"{2 * GiB}\n")
    assert memory.cgroup_limits(root, own) == [2 * GiB]


def test_available_bytes_respects_a_cgroup_v1_limit(tmp_path):
    root, own = tmp_path / "cgroup", tmp_path / "self"
    write(own, "5:cpu,cpuacct:/x\n4:memory:/process/x\n0::/\n")
    write(root / "memory" / "process" / "x" / "memory.limit_in_bytes", f"{GiB // 2}\n")
    write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # v1's "unlimited"
    assert memory.available_bytes(torch.device("cpu"), root, own) == min(GiB // 2, physical_bytes())


def test_available_bytes_without_cgroups_is_the_physical_memory(tmp_path):
    assert memory.available_bytes(torch.device("cpu"), tmp_path / "none", tmp_path / "missing") == physical_bytes()


def test_is_out_of_memory_recognises_allocation_failures():
    with pytest.raises(RuntimeError) as cpu:
        torch.empty(2**60, dtype=torch.uint8)  # beyond any address space: fails at once, touches nothing
    assert memory.is_out_of_memory(cpu.value)
    assert memory.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert memory.is_out_of_memory(MemoryError())
    assert memory.is_out_of_memory(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8"))
    assert not memory.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not memory.is_out_of_memory(ValueError("can't allocate memory"))
