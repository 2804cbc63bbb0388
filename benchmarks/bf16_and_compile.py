"""What bfloat16 autocast and torch.compile would give the training engine on this machine (neither is used:
see the README's Speed section). For a cell, in one process each (pass --mode), epochs of the engine on the
first --images prepared training images: images per second per epoch (the first epoch of `compile` includes
compiling), and the training loss and validation ELBO after the last epoch.

  float32   the engine as the pipeline runs it
  bf16      torch.autocast(bfloat16) around the training step, with the encoder's outputs (mu, log sigma^2)
            and the decoder's logits cast back to float32, so that the reparameterisation, the KL and the
            reconstruction loss are computed in float32; only the networks' layers run in bfloat16
  compile   model.loss_terms = torch.compile(model.loss_terms); TORCHINDUCTOR_CACHE_DIR decides whether the
            compiled code is already on disk (a cold cache compiles, a warm one loads)

    python benchmarks/bf16_and_compile.py linear-z20-b1-s0 --mode bf16 --images 20000 --epochs 3

Needs the prepared data (dvc repro prepare). The CPU's bfloat16 support decides the bf16 rate: torch reports
its instruction set (`cpu capability`), and a CPU without AVX-512 BF16 or AMX emulates bfloat16 matmuls.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from pipeline.config import load_study
from pipeline.data import images_to_tensor, load_prepared
from pipeline.engine import evaluate_split, model_epoch, set_threads
from pipeline.models import build_model
from pipeline.models.contract import Autoencoder
from pipeline.models.gaussian import GaussianAutoencoder
from pipeline.paths import PREPARED_FILE


def float32_outside_the_layers() -> None:
    """The encoder's outputs and the decoder's logits in float32 whatever the layers computed them in."""
    posterior, decode = GaussianAutoencoder.posterior, Autoencoder.decode
    GaussianAutoencoder.posterior = lambda self, x: tuple(part.float() for part in posterior(self, x))
    Autoencoder.decode = lambda self, z: decode(self, z).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell")
    parser.add_argument("--mode", choices=["float32", "bf16", "compile"], required=True)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    config = load_study()
    set_threads(config.threads)
    cell = dataclasses.replace(config.cell(args.cell), device="cpu")
    arrays = load_prepared(PREPARED_FILE)
    images = images_to_tensor(arrays["train_images"][: args.images])
    validation = images_to_tensor(arrays["val_images"])
    torch.manual_seed(cell.seed)
    model = build_model(cell)
    optimizer = model.make_optimizer(cell.lr)
    shuffle = torch.Generator().manual_seed(cell.seed)
    if args.mode == "compile":
        model.loss_terms = torch.compile(model.loss_terms)
    if args.mode == "bf16":
        float32_outside_the_layers()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.mode == "bf16")
    rates, started = [], time.perf_counter()
    for _ in range(args.epochs):
        epoch_started = time.perf_counter()
        with autocast:
            means = model_epoch(model, optimizer, images, cell.batch_size, shuffle)
        rates.append(len(images) / (time.perf_counter() - epoch_started))
    total = time.perf_counter() - started
    elbo = evaluate_split(model, validation).get("elbo", float("nan"))
    print(
        f"{args.cell} {args.mode} (cpu capability {torch.backends.cpu.get_cpu_capability()}): images/s per epoch "
        f"{', '.join(f'{rate:.0f}' for rate in rates)}; {total:.1f} s in all; train loss {means['loss']:.2f}, "
        f"validation ELBO {elbo:.2f} nats/image"
    )


if __name__ == "__main__":
    main()
