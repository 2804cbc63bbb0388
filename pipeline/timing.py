"""Wall time by part of a stage, for `vaebench bench` and the MLflow run (what a stage spends its time on)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Stopwatch:
    """Seconds spent in each named part; a part timed twice adds up. CUDA work is waited for, so a part
    is charged for the kernels it queued."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        _synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            _synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
