"""The isoFLOP reproduction at 1e15-1e16 FLOPs, for one accelerator (an H200).

  python scripts/sweep_isoflop.py --config=configs/isoflop_gpu.py --workdir=runs/isoflop_gpu
  python scripts/sweep_isoflop.py --config=configs/isoflop_gpu.py --workdir=/tmp/iso_smoke --smoke

The same three phases as configs/isoflop_cpu.py (LR sweep at the middle budget, the main
grid, a second seed at the 3 sizes nearest each minimum), at budgets 1e15, 3.2e15 and 1e16,
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

import ml_collections

from configs.base import SHARED_DATA


def get_config():
  c = ml_collections.ConfigDict()
  c.base = "configs/default.py"
  c.budgets = (1e15, 3.2e15, 1e16)
  c.archs = ("dense", "moe", "pkm", "peer")
  c.sizes = s = ml_collections.ConfigDict()
  s.pairs = ((128, 2), (192, 3), (256, 4), (320, 5), (384, 6), (448, 7), (512, 8))
  s.windows = ((0, 5), (1, 6), (2, 7))
  s.extend = 1
  s.head_dim = 64
  s.d_ff_ratio = 4
  c.arch_overrides = {"dense": {}, "moe": {}, "pkm": {}, "peer": {}}  # configs/default.py's
  c.overrides = {
      "model": {"dtype": "bfloat16"},
      "train": {"batch_size": 64, "seq_len": 256},
      "data": {"eval_paths": f"wikitext2_valid={SHARED_DATA}/wikitext-2/valid.txt,"
                             f"c4_sample={SHARED_DATA}/c4_en_sample/"
                             "c4-train.00000-of-01024.first1000.jsonl"},
      "checkpoint": {"keep": 1},
  }
  c.tokenizer = tk = ml_collections.ConfigDict()
  tk.vocab_size = 8192
  tk.train_path = ""
  c.lr_sweep = lr = ml_collections.ConfigDict()
  lr.budget = 3.2e15
  lr.size = (320, 5)
  lr.grid = (1e-3, 2e-3, 4e-3)
  lr.chosen = {}
  c.seeds = sd = ml_collections.ConfigDict()
  sd.extra = 1
  sd.nearest = 3
  c.tolerance = 0.03
  c.min_steps = 100
  c.warmup_fraction = 0.05
  c.eval_batches = 16
  c.checkpoint_every = 500
  c.log_every = 50
  c.flops_key = "total"
  c.fit_x = "params"
  c.select_eval_set = "wikitext2_valid"
  c.plot_eval_set = "wikitext2_valid"
  c.results_dir = "docs/results/isoflop_gpu"
  c.compilation_cache = True
  c.timing = tm = ml_collections.ConfigDict()
  tm.overhead_s = 15.0
  tm.gflops = {"dense": 150e3, "moe": 120e3, "pkm": 100e3, "peer": 100e3}
  c.smoke = {  # --smoke: 1 budget × 2 archs × 3 tiny sizes, float32 (10 runs of seconds each)
      "budgets": (2e8,), "archs": ("dense", "peer"),
      "sizes": {"pairs": ((16, 1), (16, 2), (32, 1)), "windows": (), "head_dim": 16},
      "overrides": {"model": {"dtype": "float32"}, "train": {"batch_size": 4, "seq_len": 32}},
      "arch_overrides": {"peer": {"model": {"peer": {"num_experts": 16**2, "heads": 2,
                                                     "top_k": 4, "query_dim": 16}}}},
      "tokenizer": {"vocab_size": 256},
      "lr_sweep": {"budget": 2e8, "size": (16, 2), "grid": (3e-3, 1e-2)},
      "seeds": {"nearest": 1}, "min_steps": 2, "tolerance": 0.2, "eval_batches": 1,
      "checkpoint_every": 4, "log_every": 1, "results_dir": "",
  }
  return c
