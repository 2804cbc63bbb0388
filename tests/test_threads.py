"""The study's `threads`: training computes with that many CPU threads whatever the cores it may use, so one
cell trained on one core and on two gives bitwise the same weights."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

TRAIN_ON_CORES = """
import hashlib, os, sys
import torch
from pipeline.config import parse_cell
from pipeline.engine import model_epoch, set_threads, start_training

os.sched_setaffinity(0, {int(core) for core in sys.argv[1].split(",")})
set_threads(2)
cell = parse_cell("c", {"family": "vae", "arch": "linear", "latent_dim": 10, "seed": 0}, {
    "epochs": 1, "batch_size": 128, "lr": 1e-3, "likelihood": "bernoulli", "gaussian_std": 0.1,
    "hidden": [400], "channels": [32, 64], "device": "cpu"})
images = torch.rand(2048, 1, 28, 28, generator=torch.Generator().manual_seed(0))
training = start_training(cell, torch.device("cpu"))
metrics = model_epoch(training.model, training.optimizer, images, 128, training.shuffle)
digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in training.model.state_dict().values()))
print(torch.get_num_threads(), repr(metrics["loss"]), digest.hexdigest())
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to compare one core against two")
def test_one_core_and_two_cores_train_bitwise_the_same_weights_with_the_same_threads():
    cores = sorted(os.sched_getaffinity(0))[:2]

    def train(allowed: list[int]) -> str:
        command = [sys.executable, "-c", TRAIN_ON_CORES, ",".join(map(str, allowed))]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    one_core, two_cores = train(cores[:1]), train(cores)
    assert one_core.startswith("2 ")  # two threads on one core
    assert one_core == two_cores
