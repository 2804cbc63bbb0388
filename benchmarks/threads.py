"""Seconds per training epoch and per evaluation pass of study cells at several thread counts, each count in
a fresh process, with a digest of the trained weights: the measurement behind the study's `threads`.

    python benchmarks/threads.py linear-z20-b1-s0 conv-z10-b1-s0 --threads 1 2 --repeats 3

For each cell and thread count: one training epoch of the engine on the first --images prepared training
images, then the mean loss terms over the 5,000 validation images (evaluate_split), each repeated
--repeats times in one process; prints the median (min-max) seconds and the weights' SHA-256 prefix (equal
digests: bitwise the same training). Needs the prepared data (dvc repro prepare).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import multiprocessing
import statistics
import time

import torch

from pipeline.config import load_study
from pipeline.data import images_to_tensor, load_prepared
from pipeline.engine import evaluate_split, model_epoch, set_threads, start_training
from pipeline.paths import PREPARED_FILE


def measure(cell_name: str, threads: int, images: int, repeats: int, results) -> None:
    set_threads(threads)
    config = load_study()
    cell = dataclasses.replace(config.cell(cell_name), device="cpu")
    arrays = load_prepared(PREPARED_FILE)
    train = images_to_tensor(arrays["train_images"][:images])
    validation = images_to_tensor(arrays["val_images"])
    epoch_seconds, eval_seconds = [], []
    for _ in range(repeats):
        training = start_training(cell, torch.device("cpu"))
        started = time.perf_counter()
        model_epoch(training.model, training.optimizer, train, cell.batch_size, training.shuffle)
        epoch_seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        evaluate_split(training.model, validation)
        eval_seconds.append(time.perf_counter() - started)
    weights = b"".join(t.numpy().tobytes() for t in training.model.state_dict().values())
    results.put((epoch_seconds, eval_seconds, hashlib.sha256(weights).hexdigest()[:12]))


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="+")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    print(f"{args.images} training images per epoch, {args.repeats} repeats; median (min–max) seconds")
    print("| cell | threads | epoch s | validation pass s | weights |")
    print("|---|---|---|---|---|")
    for cell in args.cells:
        for threads in args.threads:
            results = context.Queue()
            process = context.Process(target=measure, args=(cell, threads, args.images, args.repeats, results))
            process.start()
            epoch, evaluation, digest = results.get()
            process.join()
            print(f"| {cell} | {threads} | {spread(epoch)} | {spread(evaluation)} | {digest} |", flush=True)


if __name__ == "__main__":
    main()
