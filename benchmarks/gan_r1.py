"""Does the R1 penalty help the GAN here? Trains a GAN cell of the active params.yaml with several values of
`r1_weight`, everything else equal, and prints each run's FID probe per epoch (2,000 samples from a fixed z
against 2,000 validation images, MNIST-CNN features) and its training time. Needs the `prepare` and
`classifier` stages' outputs (dvc repro classifier):

    python benchmarks/gan_r1.py gan-linear-z10-ft-s0 --r1 0 1 10 --train-images 20000

This is how the default `r1_weight: 0` was chosen (see README, Model families).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from pipeline import engine
from pipeline.classifier import load_classifier
from pipeline.config import load_study
from pipeline.data import images_to_tensor, load_prepared
from pipeline.evaluation.probe import FIDProbe
from pipeline.paths import PREPARED_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell", help="a gan or vaegan cell of params.yaml (its init_from is ignored: from scratch)")
    parser.add_argument("--r1", type=float, nargs="+", default=[0.0, 1.0, 10.0], help="r1_weight values to compare")
    parser.add_argument("--train-images", type=int, default=20_000, help="the first N prepared training images")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (the probe's z stays fixed)")
    args = parser.parse_args()

    config = load_study()
    device = engine.resolve_device("auto")
    engine.set_threads()
    arrays = load_prepared(PREPARED_FILE)
    train_images = images_to_tensor(arrays["train_images"][: args.train_images], device)
    val_images = images_to_tensor(arrays["val_images"], device)
    base = dataclasses.replace(config.cell(args.cell), init_from=None)
    probe = FIDProbe(load_classifier(device), val_images, base.latent_dim, seed=0)
    for seed in args.seeds:
        for weight in args.r1:
            cell = dataclasses.replace(base, seed=seed, settings=dataclasses.replace(base.settings, r1_weight=weight))
            training = engine.start_training(cell, device)
            started = time.perf_counter()
            curve = [row["val_fid_probe"] for row in engine.epochs(training, train_images, val_images, probe)]
            result = {
                "seed": seed,
                "r1_weight": weight,
                "fid_probe": [round(v, 2) for v in curve],
                "seconds": round(time.perf_counter() - started, 1),
            }
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
