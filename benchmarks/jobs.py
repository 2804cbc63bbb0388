"""Training throughput of N concurrent jobs at T threads each: the measurement behind the studies' `threads`
and `vaebench repro --jobs`'s default (cores / threads).

    python benchmarks/jobs.py conv-z10-b1-s0 linear-z20-b1-s0 --layouts 1x2 2x1 2x2 --images 10000

For each cell and layout JxT: J processes start together, each training one epoch of the engine on the first
--images prepared training images with T threads (benchmarks/threads.py's measurement); prints the wall time
until all J finish and the seconds per epoch of throughput (wall / J). Needs the prepared data (dvc repro
prepare). Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def layout_wall_seconds(cell: str, jobs: int, threads: int, images: int) -> float:
    command = [sys.executable, str(HERE / "threads.py"), cell, "--threads", str(threads), "--images", str(images)]
    command += ["--repeats", "1"]
    started = time.perf_counter()
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL) for _ in range(jobs)]
    if any(process.wait() != 0 for process in processes):
        raise SystemExit(f"{' '.join(command)} failed")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="+")
    parser.add_argument("--layouts", nargs="+", default=["1x2", "2x1", "2x2"], help="JOBSxTHREADS")
    parser.add_argument("--images", type=int, default=10_000)
    args = parser.parse_args()
    print(f"{args.images} training images per epoch; the wall time includes each process's start-up")
    print("| cell | jobs x threads | wall s | s per epoch (wall / jobs) |")
    print("|---|---|---|---|")
    for cell in args.cells:
        for layout in args.layouts:
            jobs, threads = (int(part) for part in layout.split("x"))
            wall = layout_wall_seconds(cell, jobs, threads, args.images)
            print(f"| {cell} | {jobs} x {threads} | {wall:.1f} | {wall / jobs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
