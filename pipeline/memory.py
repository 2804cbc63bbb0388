"""How much memory training a cell takes, how much this process may use, and a check that refuses a cell
beyond the machine before it is trained (instead of an allocation failure deep in the first epoch, or the
OOM killer).

The estimate counts the model without allocating it: the model is built on PyTorch's meta device (shapes,
no storage), so a cell with a billion parameters costs the estimate a few milliseconds. The first meta
build of a process also imports torch's Python meta kernels (about a second, once).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from pipeline.config import CellConfig, ConfigError
from pipeline.models import build_model
from pipeline.models.networks import IMAGE_SIZE, PIXELS

# Adam's exp_avg and exp_avg_sq, plus the temporary its step makes (sqrt of exp_avg_sq: one parameter at a
# time on CPU, all at once with foreach on CUDA). Every family's make_optimizer is one Adam over all its
# parameters (the adversarial families give the discriminator its own group in the same Adam).
OPTIMIZER_COPIES = 3
# One training batch's activations, as the sum of every layer's output in one pass through each network:
# each output is kept for backward and has a gradient of its own size during backward (x2), and the
# adversarial families run the discriminator up to three times a step and the VAE-GAN its decoder twice
# (x2 more).
TRAINING_ACTIVATION_FACTOR = 4
# engine.evaluate_split (every epoch), encode_all and the adversarial probe go through images 1000 at a time,
# without a graph: one pass's outputs bound what is alive at once.
EVALUATION_BATCH = 1000
BYTES_PER_IMAGE = PIXELS * 4  # the engine keeps each split on the device as one float32 (N, 1, 28, 28) tensor
# The interpreter, torch and MLflow: 0.65 GB RSS after importing the train stage (CUDA build of torch 2.14, on
# CPU), about 0.8 GB once the first batch has run; on CUDA, the context takes a few hundred MB of the device.
RUNTIME_BYTES = 1 << 30
# The share of the limit a cell's estimate may take. The estimate already counts the runtime; the rest is
# headroom for what it leaves out (allocator fragmentation and caching, MLflow's buffers, the probe's
# classifier) and for its error: measured peak RSS was 50-85% of the estimate on CPU.
LIMIT_SHARE = 0.9

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_V2_LIMIT = "memory.max"  # "max" when unlimited
CGROUP_V1_LIMIT = "memory.limit_in_bytes"  # a number near 2**63 when unlimited


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a cell's training holds at its peak, by part."""

    parameters: int  # weights and buffers
    gradients: int
    optimizer: int
    activations: int
    data: int  # the training and validation images on the device
    runtime: int

    @property
    def total(self) -> int:
        return sum(getattr(self, part.name) for part in fields(self))

    def largest(self) -> tuple[str, int]:
        """The biggest part: its name and bytes."""
        return max(((part.name, getattr(self, part.name)) for part in fields(self)), key=lambda item: item[1])


def estimate_training(cell: CellConfig, train_images: int, val_images: int = 0) -> MemoryEstimate:
    """The memory training `cell` on `train_images` (validating on `val_images`) takes, by part."""
    with torch.device("meta"):
        model = build_model(cell)
    trainable = sum(_nbytes(p) for p in model.parameters())
    buffers = sum(_nbytes(b) for b in model.buffers())
    activations = max(
        TRAINING_ACTIVATION_FACTOR * _pass_bytes(model, cell.batch_size, cell.latent_dim),
        _pass_bytes(model, EVALUATION_BATCH, cell.latent_dim),
    )
    return MemoryEstimate(
        parameters=trainable + buffers,
        gradients=trainable,
        optimizer=OPTIMIZER_COPIES * trainable,
        activations=activations,
        data=(train_images + val_images) * BYTES_PER_IMAGE,
        runtime=RUNTIME_BYTES,
    )


def estimate_training_bytes(cell: CellConfig, train_images: int, val_images: int = 0) -> int:
    return estimate_training(cell, train_images, val_images).total


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _pass_bytes(model: nn.Module, batch: int, latent_dim: int) -> int:
    """The input batch and the outputs of every layer in one pass of `batch` images through each network of
    the model (encoder, decoder, and a separate discriminator), on meta tensors. Views (Flatten, Unflatten)
    share their input's storage and are not counted."""
    total = batch * BYTES_PER_IMAGE

    def count(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor) and output._base is None:
            total += _nbytes(output)

    leaves = [module for module in model.modules() if not any(module.children())]
    hooks = [module.register_forward_hook(count) for module in leaves]
    try:
        with torch.no_grad():
            images = torch.empty(batch, 1, IMAGE_SIZE, IMAGE_SIZE, device="meta")
            model.encoder(images)
            model.decoder(torch.empty(batch, latent_dim, device="meta"))
            discriminator = getattr(model, "discriminator", None)
            if isinstance(discriminator, nn.Module) and discriminator is not model.encoder:
                discriminator(images)
    finally:
        for hook in hooks:
            hook.remove()
    return total


def available_bytes(device: torch.device, cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int:
    """The memory this process may use on `device`: a CUDA device's total memory; on CPU, the smaller of the
    physical memory and the cgroup limit of this process (its own cgroup or any above it, v1 or v2)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min([physical, *cgroup_limits(cgroup_root, self_cgroup)])


def cgroup_limits(cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> list[int]:
    """The memory limits (bytes) on this process's cgroups and their ancestors; unlimited ones are left out.

    /proc/self/cgroup names each hierarchy's cgroup: `0::/path` (v2, mounted at the root) or
    `N:memory:/path` (v1, mounted at root/memory). Inside a container the path may not exist under the
    mount (the mount is the container's own cgroup), so every existing directory from the cgroup up to the
    mount is read."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        lines = ["0::/"]
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            mount, limit_file = cgroup_root, CGROUP_V2_LIMIT
        elif "memory" in controllers.split(","):
            mount, limit_file = cgroup_root / "memory", CGROUP_V1_LIMIT
        else:
            continue
        directory = mount / path.lstrip("/")
        for folder in [directory, *directory.parents]:
            limit = _read_limit(folder / limit_file)
            if limit is not None:
                limits.append(limit)
            if folder == mount:
                break
    return limits


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def check_memory(cell: CellConfig, train_images: int, device: torch.device, val_images: int = 0) -> None:
    """Refuse, with one line, a cell whose estimated training memory exceeds LIMIT_SHARE of what the device
    offers this process."""
    estimate = estimate_training(cell, train_images, val_images)
    limit = available_bytes(device)
    if estimate.total <= LIMIT_SHARE * limit:
        return
    part, part_bytes = estimate.largest()
    raise ConfigError(
        f"cell {cell.name}: training needs about {_gib(estimate.total)} ({part} {_gib(part_bytes)}), more than "
        f"{LIMIT_SHARE:.0%} of the {_gib(limit)} this process may use on {device.type}; "
        "lower latent_dim/hidden/channels/batch_size"
    )


def _gib(size: int) -> str:
    gib = size / 2**30
    return f"{gib:,.1f} GiB" if gib < 1e6 else f"{gib:.1e} GiB"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation failure: CUDA's OutOfMemoryError, Python's MemoryError, or the
    RuntimeError of torch's CPU allocator ("DefaultCPUAllocator: can't allocate memory: you tried to
    allocate N bytes", or "not enough memory" on some platforms)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in message or "DefaultCPUAllocator: not enough memory" in message
    )
