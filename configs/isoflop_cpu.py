"""The small-scale isoFLOP reproduction that two CPU cores can run (docs/reproduction.md).

  python scripts/sweep_isoflop.py --config=configs/isoflop_cpu.py --workdir=runs/isoflop_cpu

Dense, MoE, PKM and PEER at three budgets spanning 10× (5e11, 1.6e12, 5e12 training FLOPs),
five sizes per (budget, architecture) from a ladder of (d_model, num_layers) sizes (the
window moves up with the budget, since the optimum moves to larger models), trained on
WikiText-2 train with a 4096-piece SentencePiece model the sweep trains itself (cached in
WORKDIR/tokenizer), evaluated on WikiText-2 valid and the bundled C4 sample. Phases, all in
one command:
  1. LR sweep: 6e-3 ... 9.6e-2 (factors of 2) at the middle budget and size (d32 × 2), per
     architecture; the choices are pinned in lr_sweep.chosen;
  2. the main grid at each architecture's chosen LR;
  3. a curve whose minimum is at an end of its fit family adds the next size of that depth
     on that side (up to sizes.extend per curve; none beyond the ladder's ends);
  4. a second seed for the 3 sizes nearest each curve's minimum on WikiText-2 valid.

Each curve is fitted over the sizes of one depth (fit_family = 'depth': its most-populated
depth, two blocks here). The two lower windows hold one-block sizes from the first design;
fitted with them, the expert models' curves carried a step that is not about size: in a
one-block model the expert layer is the model's only FFW (docs/reproduction.md). The 5e12
window is two-block sizes only.

Every finished run writes a small summary to docs/results/isoflop_cpu/runs/ (commit them);
`--collect_only` regenerates the table and plot from those alone. Every run starts from
configs/default.py (its PEER, MoE and PKM settings) with the size's width and depth. Two
cores sustain 6-21 GFLOP/s on these models (the logits over 4096 pieces dominate the small
ones): ~73 s per 5e11 run, ~150 s per 1.6e12 run, ~7 min per 5e12 run. `--dry_run` prints
the estimate; the whole sweep is ~7 h, resumable. configs/isoflop_cpu_small.py is the
first design (5e10-5e11), which fits 100 minutes but cannot bracket its minima.
"""

import ml_collections

from configs.base import SHARED_DATA


def get_config():
  c = ml_collections.ConfigDict()
  c.base = "configs/default.py"
  c.budgets = (5e11, 1.6e12, 5e12)
  c.archs = ("dense", "moe", "pkm", "peer")
  c.sizes = s = ml_collections.ConfigDict()
  s.pairs = ((16, 1), (16, 2), (32, 1), (32, 2), (48, 2), (64, 2), (96, 2), (128, 2))  # small first
  s.windows = ((0, 5), (1, 6), (3, 8))  # sizes of each budget: a slice of pairs
  s.extend = 3  # a curve not bracketed adds the next size of its depth beyond its best end
  s.head_dim = 16
  s.d_ff_ratio = 4
  c.arch_overrides = {"dense": {}, "moe": {}, "pkm": {}, "peer": {}}  # configs/default.py's
  c.overrides = {
      "train": {"batch_size": 16, "seq_len": 128},
      "data": {"eval_paths": f"wikitext2_valid={SHARED_DATA}/wikitext-2/valid.txt,"
                             f"c4_sample={SHARED_DATA}/c4_en_sample/"
                             "c4-train.00000-of-01024.first1000.jsonl"},
      "checkpoint": {"keep": 1},
  }
  c.tokenizer = tk = ml_collections.ConfigDict()
  tk.vocab_size = 4096  # trained on data.train_path (WikiText-2 train) on first use
  tk.train_path = ""    # "": the base config's data.train_path
  c.lr_sweep = lr = ml_collections.ConfigDict()
  lr.budget = 1.6e12
  lr.size = (32, 2)
  lr.grid = (6e-3, 1.2e-2, 2.4e-2, 4.8e-2, 9.6e-2)
  # Pin the LR sweep's choice here once it has run ({"dense": 6e-3, ...}); empty: use the
  # grid's best of the LR-sweep summaries in results_dir (the sweep prints its choice).
  lr.chosen = {"dense": 4.8e-2, "moe": 2.4e-2, "pkm": 2.4e-2, "peer": 2.4e-2}  # measured: an
  # interior best of the grid for each (docs/reproduction.md)
  c.seeds = sd = ml_collections.ConfigDict()
  sd.extra = 1    # seed 1 ...
  sd.nearest = 3  # ... for the 3 sizes nearest each fitted minimum (or best run)
  c.tolerance = 0.05
  c.min_steps = 10
  c.warmup_fraction = 0.05
  c.eval_batches = 16
  c.checkpoint_every = 500
  c.log_every = 10
  c.flops_key = "total"
  c.fit_x = "params"
  c.fit_family = "depth"  # fit one depth per curve (see above)
  c.select_eval_set = "wikitext2_valid"
  c.plot_eval_set = "wikitext2_valid"
  c.results_dir = "docs/results/isoflop_cpu"
  c.compilation_cache = True  # WORKDIR/jax_cache, shared by every run
  c.timing = tm = ml_collections.ConfigDict()
  tm.overhead_s = 20.0
  tm.tokens_per_sec = {"dense": 15000.0, "moe": 14000.0, "pkm": 9000.0, "peer": 10000.0}
  tm.gflops = {"dense": 13.0, "moe": 12.0, "pkm": 11.0, "peer": 11.0}
  c.smoke = {  # --smoke: 1 budget × 2 archs × 3 tiny sizes (10 runs of seconds each)
      "budgets": (2e8,), "archs": ("dense", "peer"),
      "sizes": {"pairs": ((16, 1), (16, 2), (32, 1)), "windows": ()},
      "overrides": {"train": {"batch_size": 4, "seq_len": 32}},
      "arch_overrides": {"peer": {"model": {"peer": {"num_experts": 16**2, "heads": 2,
                                                     "top_k": 4, "query_dim": 16}}}},
      "tokenizer": {"vocab_size": 256},
      "lr_sweep": {"budget": 2e8, "size": (16, 2), "grid": (3e-3, 1e-2)},
      "seeds": {"nearest": 1}, "min_steps": 2, "tolerance": 0.2, "eval_batches": 1, "checkpoint_every": 4,
      "log_every": 1, "results_dir": "",
  }
  return c
