"""The isoFLOP reproduction at 1e15-1e16 FLOPs, for one accelerator (an H200).

  python scripts/sweep_isoflop.py --config=configs/isoflop_gpu.py --workdir=runs/isoflop_gpu
  python scripts/sweep_isoflop.py --config=configs/isoflop_gpu.py --workdir=/tmp/iso_smoke --smoke

Derived from configs/isoflop_cpu.py: the same three phases (LR sweep at the middle budget,
the main grid, a second seed at the 3 sizes nearest each minimum) and settings, except what
`get_config` below states: budgets 1e15, 3.2e15 and 1e16,
five sizes per (budget, architecture) from a seven-size ladder (d_model 128..512, head
dim 64), batch 64 × 256 in bfloat16, an 8192-piece tokenizer trained on WikiText-2 train.
Summaries go to docs/results/isoflop_gpu/.

Not measured on a GPU yet: `timing` below is an assumption (~15 s start-up and compilation
per run, 100-150 TFLOP/s sustained), and `--dry_run` prints the estimate it gives; measure
and correct it on the first run. WikiText-2 train is ~2.7 M tokens of this tokenizer, so
the larger budgets train for many epochs over it; point data.train_path at a bigger corpus
(`--config.overrides.data.train_path=...`) where one is available.

`--smoke` is a tiny CPU form of the same sweep (two architectures, three tiny sizes, one
budget; seconds per run): tests/test_sweep.py runs it end to end in the slow suite.
"""

from configs import isoflop_cpu


def get_config():
  c = isoflop_cpu.get_config()
  c.budgets = (1e15, 3.2e15, 1e16)
  s = c.sizes
  s.pairs = ((128, 2), (192, 3), (256, 4), (320, 5), (384, 6), (448, 7), (512, 8))
  s.windows = ((0, 5), (1, 6), (2, 7))
  s.head_dim = 64
  c.overrides = {"model": {"dtype": "bfloat16"}, **c.overrides.to_dict()}
  c.overrides.train.batch_size, c.overrides.train.seq_len = 64, 256
  c.tokenizer.vocab_size = 8192
  lr = c.lr_sweep
  lr.budget, lr.size, lr.grid = 3.2e15, (320, 5), (1e-3, 2e-3, 4e-3)
  lr.chosen = {}  # the CPU sweep's pinned LRs do not carry over: this sweep measures its own
  c.tolerance = 0.03
  c.min_steps = 100
  c.checkpoint_every = 500
  c.log_every = 50
  c.results_dir = "docs/results/isoflop_gpu"
  tm = c.timing
  tm.overhead_s = 15.0  # an assumption until measured (see above)
  del tm["tokens_per_sec"]
  tm.gflops = {"dense": 150e3, "moe": 120e3, "pkm": 100e3, "peer": 100e3}
  # --smoke: the CPU config's smoke form, in float32 with the CPU head dim.
  c.smoke.sizes.head_dim = 16
  c.smoke.overrides = {"model": {"dtype": "float32"}, **c.smoke.overrides.to_dict()}
  return c
