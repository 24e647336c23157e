"""A small isoFLOP reproduction that runs on two CPU cores: dense, MoE, PKM and PEER at two
budgets, three sizes each (24 runs), trained on WikiText-2 train, evaluated on WikiText-2 valid
and the C4 sample.

  python scripts/sweep_isoflop.py --config=configs/isoflop_cpu.py --workdir=/tmp/isoflop_cpu

Every run starts from configs/default.py (the quickstart PEER model: 128² experts, 4 heads ×
top-8, query dim 64, query BN; MoE of 8 experts; PKM of 128² memories, 4 heads × top-8) with
the width/depth of its size and the budget's step count. With the 32k-piece tokenizer the
(un)embedding dominates both FLOPs and parameters at these widths, so the sizes are small
(d_model 32..64) to give each curve a chance of an interior minimum. docs/sweeps.md has the
measured step times this budget is sized from.
"""

import ml_collections

from configs.base import SHARED_DATA


def get_config():
  c = ml_collections.ConfigDict()
  c.base = "configs/default.py"
  c.budgets = (6e11, 2e12)  # the paper's 6e18 and 2e19, scaled by 1e-7
  c.archs = ("dense", "moe", "pkm", "peer")
  c.sizes = s = ml_collections.ConfigDict()
  s.pairs = ((32, 2), (48, 2), (64, 3))
  s.head_dim = 16
  s.d_ff_ratio = 4
  c.arch_overrides = {"dense": {}, "moe": {}, "pkm": {}, "peer": {}}  # configs/default.py's
  c.overrides = {
      "train": {"batch_size": 8, "seq_len": 128, "learning_rate": 6e-3, "log_every": 10},
      "data": {"eval_paths": f"wikitext2_valid={SHARED_DATA}/wikitext-2/valid.txt,c4={SHARED_DATA}"
                             "/c4_en_sample/c4-train.00000-of-01024.first1000.jsonl",
               "eval_batches": 16},
      "checkpoint": {"every": 50, "keep": 1},
  }
  c.tolerance = 0.03
  c.min_steps = 20
  c.warmup_fraction = 0.05
  c.flops_key = "total"
  c.fit_x = "params"
  c.plot_eval_set = "wikitext2_valid"
  return c
