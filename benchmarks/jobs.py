"""Training throughput of N concurrent jobs at T threads each: the measurement behind the studies' `threads`
and `vaebench repro --jobs`'s default (cores / threads).

    python benchmarks/jobs.py conv-z10-b1-s0 linear-z20-b1-s0 --layouts 1x2 2x1 2x2 2x2-sleep --images 10000

For each cell and layout JxT: J processes start together, each training one epoch of the engine on the first
--images prepared training images with T threads (benchmarks/threads.py's measurement); prints the wall time
until all J finish and the seconds per epoch of throughput (wall / J). A `-sleep` layout sets
OMP_WAIT_POLICY=PASSIVE, as `vaebench repro --jobs` does when the jobs' threads outnumber the cores. Needs
the prepared data (dvc repro prepare). Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def layout_wall_seconds(cell: str, jobs: int, threads: int, images: int, sleep: bool) -> float:
    command = [sys.executable, str(HERE / "threads.py"), cell, "--threads", str(threads), "--images", str(images)]
    command += ["--repeats", "1"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"} if sleep else os.environ
    started = time.perf_counter()
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env) for _ in range(jobs)]
    if any(process.wait() != 0 for process in processes):
        raise SystemExit(f"{' '.join(command)} failed")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="+")
    parser.add_argument("--layouts", nargs="+", default=["1x2", "2x1", "2x2", "2x2-sleep"], help="JOBSxTHREADS[-sleep]")
    parser.add_argument("--images", type=int, default=10_000)
    args = parser.parse_args()
    print(f"{args.images} training images per epoch; the wall time includes each process's start-up")
    print("| cell | jobs x threads | wall s | s per epoch (wall / jobs) |")
    print("|---|---|---|---|")
    for cell in args.cells:
        for layout in args.layouts:
            shape, _, sleep = layout.partition("-")
            jobs, threads = (int(part) for part in shape.split("x"))
            wall = layout_wall_seconds(cell, jobs, threads, args.images, sleep == "sleep")
            print(f"| {cell} | {layout} | {wall:.1f} | {wall / jobs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
