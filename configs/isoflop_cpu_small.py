"""The first CPU isoFLOP design, at 5e10, 1.6e11 and 5e11 FLOPs: it fits 100 minutes on
2 cores, but most of its minima are not bracketed (docs/reproduction.md).

  python scripts/sweep_isoflop.py --config=configs/isoflop_cpu_small.py --collect_only

Derived from configs/isoflop_cpu.py, as it ran (127 runs, ~115 minutes on 2 shared
cores; summaries in docs/results/isoflop_cpu_small/): what differs is set below. At these
budgets the compute-optimal model is at or below the smallest model a 4096-piece vocabulary
allows (the embedding of a d_model 16 model alone has 131 k parameters), so 16 of its 24
curves end at the smallest size; configs/isoflop_cpu.py moves the budgets up a decade.
"""

from configs import isoflop_cpu


def get_config():
  c = isoflop_cpu.get_config()
  c.budgets = (5e10, 1.6e11, 5e11)
  c.sizes.pairs = ((16, 1), (16, 2), (32, 1), (32, 2), (48, 2), (64, 2), (64, 3), (96, 3))
  c.sizes.windows = ((0, 5), (2, 7), (3, 8))
  c.sizes.extend = 3
  c.fit_family = "all"  # as it was analysed
  lr = c.lr_sweep
  lr.budget, lr.size = 1.6e11, (48, 2)
  lr.grid = (3e-3, 6e-3, 1.2e-2, 2.4e-2, 4.8e-2)
  lr.chosen = {"dense": 2.4e-2, "moe": 2.4e-2, "pkm": 2.4e-2, "peer": 2.4e-2}  # measured
  c.checkpoint_every = 100
  c.results_dir = "docs/results/isoflop_cpu_small"
  tm = c.timing
  tm.overhead_s = 18.0  # ~25 s uncached; less once a size's programs are cached
  tm.tokens_per_sec = {"dense": 4000.0, "moe": 4000.0, "pkm": 3500.0, "peer": 4000.0}
  del tm["gflops"]
  return c
