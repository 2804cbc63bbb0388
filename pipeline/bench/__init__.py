"""`vaebench bench`: how fast training and the study are, side by side with the standard loop, the classic
recipe and the compute bound. Writes reports/benchmarks/.

Per architecture, images per second of
  (a) the engine (pipeline/engine.py: images resident on the device, index-permutation shuffling, loss
      sums read once per epoch),
  (b) the standard loop: torchvision's MNIST with the ToTensor transform behind a shuffling DataLoader,
      a `.item()` per step,
  (c) the compute bound: forward, backward and optimizer step on one pre-made batch in a tight loop,
with achieved GFLOP/s (FLOPs counted by torch's FlopCounterMode) against the measured float32 matmul
GFLOP/s, and each measurement's peak memory (each runs in a fresh process; each rate is the best of 3
timed repeats after a warm-up). Then whole processes: the classic PyTorch-examples recipe
(benchmarks/reference_vae.py) beside `python -m pipeline train CELL` and `evaluate CELL`, start-up and
logging included, with each stage's time by part. All of it is repeated `--runs` times (the table shows
the median and range). `--study` times `dvc repro` of the committed study from clean, by stage.
"""

from pipeline.bench.run import check_bench_cells, run_bench
from pipeline.bench.tables import table, write_results

__all__ = ["check_bench_cells", "run_bench", "table", "write_results"]
