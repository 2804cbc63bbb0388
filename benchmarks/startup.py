"""Each stage's fixed cost before its work: a fresh Python process that imports what the stage's command
imports, and, for the stages that log, opens the MLflow store once as the stage does (tracking.check_store).

    python benchmarks/startup.py --repeats 5

Prints the median (min–max) wall seconds per stage, each repeat a new process, as `dvc repro` starts one.
Run it in the repository root (the store is its mlflow.db, created if missing).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

# The module each stage's `python -m pipeline STAGE` imports, and whether it opens the tracking store.
STAGES = {
    "prepare": ("pipeline.prepare", False),
    "classifier": ("pipeline.classifier", False),
    "floor": ("pipeline.floor", False),
    "train": ("pipeline.train", True),
    "evaluate": ("pipeline.evaluate", True),
    "report": ("pipeline.report", True),
}


def startup_seconds(module: str, opens_store: bool) -> float:
    code = f"import pipeline.cli, {module}"
    if opens_store:
        code += "\nfrom pipeline import tracking\ntracking.check_store()"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{args.repeats} fresh processes per stage; median (min–max) wall seconds")
    print("| stage | imports | opens the store | seconds |")
    print("|---|---|---|---|")
    for stage, (module, opens_store) in STAGES.items():
        seconds = [startup_seconds(module, opens_store) for _ in range(args.repeats)]
        spread = f"{statistics.median(seconds):.2f} ({min(seconds):.2f}–{max(seconds):.2f})"
        print(f"| {stage} | {module} | {'yes' if opens_store else 'no'} | {spread} |", flush=True)


if __name__ == "__main__":
    main()
