"""The paper's isoFLOP sweep (He 2024, §3): budgets 6e18 and 2e19 FLOPs, C4, batch 128 × 2048.

Plan only on a workstation (`--dry_run`, `--launcher=print`, `--launcher=gcloud --dry_run`);
the runs need a TPU pod. Baselines as in the paper: the middle block's FFW replaced by an
expert-choice MoE (128 experts, each the size of the dense FFW), a PKM (1024² memories,
h = 8, k = 32, query BN) or PEER (1024² experts, h = 8, k = 16, query BN). The paper does not
state its widths and depths; the grid below spans ~0.1-1 B dense parameters, which at these
budgets puts the dense compute-optimal point (~20 tokens per parameter) inside the range.

  python scripts/sweep_isoflop.py --config=configs/isoflop_paper.py --workdir=runs/isoflop_paper \
      --dry_run
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.base = "configs/base.py"
  c.budgets = (6e18, 2e19)
  c.archs = ("dense", "moe", "pkm", "peer")
  c.sizes = s = ml_collections.ConfigDict()
  s.pairs = ((512, 8), (640, 10), (768, 12), (896, 14), (1024, 16), (1280, 18), (1536, 20))
  s.head_dim = 64
  s.d_ff_ratio = 4
  # Per-architecture layer settings, nested like configs/base.py.
  c.arch_overrides = {
      "dense": {},
      "moe": {"model": {"moe": {"num_experts": 128, "capacity_factor": 1.0}}},
      "pkm": {"model": {"pkm": {"num_memories": 1024**2, "heads": 8, "top_k": 32,
                                "key_dim": 256, "query_norm": "batchnorm"}}},
      "peer": {"model": {"peer": {"num_experts": 1024**2, "heads": 8, "top_k": 16,
                                  "query_dim": 256, "query_norm": "batchnorm"}}},
  }
  # Every run (nested like configs/base.py); steps, warmup and eval_every come from the plan.
  c.overrides = {
      "model": {"ffw_layers": "middle", "dtype": "bfloat16", "remat": True},
      "train": {"batch_size": 128, "seq_len": 2048, "learning_rate": 1e-3, "log_every": 100},
      "data": {"train_path": "tfds:c4/en:3.1.0",
               "eval_paths": "c4_valid=tfds:c4/en:3.1.0[validation]", "eval_batches": 64},
      "checkpoint": {"every": 1000},
  }
  c.tolerance = 0.03
  c.min_steps = 1000
  c.warmup_fraction = 0.02
  c.flops_key = "total"
  c.fit_x = "params"
  c.plot_eval_set = "c4_valid"
  c.gcloud = g = ml_collections.ConfigDict()
  g.tpus = ("peer-v5p-64-a", "peer-v5p-64-b")
  g.zone = "us-east5-a"
  g.project = ""
  g.repo_dir = "peer_jax"  # on the VMs, relative to the login directory
  g.python = "python3"
  g.workdir = "runs/isoflop_paper"  # on the VMs, relative to repo_dir (or a shared mount)
  return c
