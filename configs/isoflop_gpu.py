"""The isoFLOP reproduction one decade above the CPU sweep, for one accelerator (an H200).

  python scripts/sweep_isoflop.py --config=configs/isoflop_gpu.py --workdir=runs/isoflop_gpu
  python scripts/sweep_isoflop.py --config=configs/isoflop_gpu.py --workdir=/tmp/iso_smoke --smoke

Derived from configs/isoflop_cpu.py: the same phases (LR sweep at the middle budget, the
main grid, a curve not bracketed grows by a ladder size, a second seed at the 3 sizes
nearest each minimum), the same 4096-piece tokenizer trained on WikiText-2 train and the
same eval sets, so its curves continue the CPU sweep's (5e11-5e12) upwards: budgets 5e13,
1.6e14 and 5e14; five sizes per (budget, architecture) from a seven-size ladder (d_model
64..384, head dim 32, windows around the optimum the CPU sweep's scaling predicts); batch
64 × 256 in bfloat16; every run in one process (`launcher = "inprocess"`), where runs of
one size share one compiled step (peer_jax/schedules.py).

Why not the 1e15-1e16 the issue suggested: ~110 runs at those budgets are ~5e17 FLOPs, an
hour at 150 TFLOP/s sustained, not ten minutes; these budgets are ~2.4e16 FLOPs in all.

Not measured on a GPU yet: `timing` is an assumption (100 TFLOP/s for dense, 70 for the
expert layers, 2 s per run in process, 8 s per compiled program), and `--dry_run` prints the
estimate it gives (~12 minutes, of which ~7 are start-up and compiles); measure and correct it on the first run. WikiText-2 train
is ~2.4 M tokens of this tokenizer, so these budgets train for several epochs over it; point
data.train_path at a bigger corpus (`--config.overrides.data.train_path=...`) where one is.

`--smoke` is a tiny CPU form of the same sweep (two architectures, three tiny sizes, one
budget; seconds per run): tests/test_sweep.py runs it end to end in the slow suite.
"""

from configs import isoflop_cpu


def get_config():
  c = isoflop_cpu.get_config()
  c.budgets = (5e13, 1.6e14, 5e14)
  s = c.sizes
  s.pairs = ((64, 3), (96, 3), (128, 3), (192, 3), (256, 3), (384, 3), (512, 3))  # one depth: fit_family
  s.windows = ((0, 5), (1, 6), (2, 7))
  s.head_dim = 32
  c.overrides = {"model": {"dtype": "bfloat16"}, **c.overrides.to_dict()}
  c.overrides.train.batch_size, c.overrides.train.seq_len = 64, 256
  lr = c.lr_sweep
  lr.budget, lr.size, lr.grid = 1.6e14, (128, 3), (3e-3, 6e-3, 1.2e-2, 2.4e-2)
  lr.chosen = {}  # the CPU sweep's LRs do not carry over: this sweep measures its own
  c.launcher = "inprocess"
  c.tolerance = 0.03
  c.min_steps = 100
  c.checkpoint_every = 500
  c.log_every = 50
  c.results_dir = "docs/results/isoflop_gpu"
  tm = c.timing
  tm.overhead_s = 2.0  # in process: data, eval sets, eval, saves (an assumption until measured)
  tm.compile_s = 8.0   # per (architecture, size): its train and eval steps
  del tm["tokens_per_sec"]
  tm.gflops = {"dense": 100e3, "moe": 70e3, "pkm": 70e3, "peer": 70e3}
  # --smoke: the CPU config's smoke form, in float32 with the CPU head dim.
  c.smoke.sizes.head_dim = 16
  c.smoke.overrides = {"model": {"dtype": "float32"}, **c.smoke.overrides.to_dict()}
  return c
