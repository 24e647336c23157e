"""The paper's Table 1 procedure (He 2024, §3): an isoFLOP sweep at 6e18 and 2e19 FLOPs.

Each method (dense, MoE, PKM, PEER) is trained at every size of one backbone family at each
budget, model size traded against tokens, and each is reported at the minimum of its own
isoFLOP curve. This is the procedure behind the paper's Table 1. The single-run configs
configs/c4_*.py are not: they put every method on the dense compute-optimal backbone, and
each of them is one point of this sweep (tests/test_paper_configs.py).

Plan only on a workstation (`--dry_run`, `--launcher=print`, `--launcher=gcloud --dry_run`);
the runs need a TPU pod:

  python scripts/sweep_isoflop.py --config=configs/isoflop_paper.py --workdir=runs/isoflop_paper \
      --dry_run

Stated by the paper and used here: C4, batch 128 × 2048, the middle block's FFW replaced by an
expert-choice MoE (128 experts, each the size of the dense FFW), a PKM (1024² memories,
h = 8, k = 32, query BN) or PEER (1024² experts, h = 8, k = 16, query BN). Our choices, all in
configs/_c4.py (the paper does not state them): the sizes (_c4.FAMILY: d_model 640 ... 2048,
num_layers round(d_model / 85), head dim 64, d_ff 4·d_model; seven sizes per budget, centred
on the dense optimum), the PEER query dim and PKM key dim (256), the MoE capacity factor (base's
2.0), the tokenizer, LR and warmup, and the eval sets (C4 validation from TFDS; WikiText-103,
the Pile, Curation Corpus and LAMBADA from $PEER_EVAL_DATA when set; docs/evaluation.md).
Expert-choice MoE is NOT causal (docs/configuration.md, model.moe.routing).
"""

import ml_collections

from configs import _c4

# Set by the sweep for every run (model.ffw) or in `overrides` below (the rest).
_COMMON_MODEL_KEYS = ("model.ffw", "model.ffw_layers", "model.dtype", "model.remat")


def _nested(flat: dict) -> dict:
  out: dict = {}
  for key, value in flat.items():
    *parents, leaf = key.split(".")
    node = out
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return out


def get_config():
  c = ml_collections.ConfigDict()
  c.base = "configs/base.py"
  c.budgets = tuple(_c4.BUDGETS.values())
  c.archs = ("dense", "moe", "pkm", "peer")
  c.sizes = s = ml_collections.ConfigDict()
  s.pairs = _c4.FAMILY
  s.windows = _c4.SWEEP_WINDOWS
  s.head_dim = _c4.HEAD_DIM
  s.d_ff_ratio = _c4.D_FF_RATIO
  # Per-architecture layer settings, nested like configs/base.py (configs/_c4.py).
  c.arch_overrides = {
      arch: _nested({k: v for k, v in _c4.model_settings(arch).items()
                     if k not in _COMMON_MODEL_KEYS})
      for arch in ("dense", "moe", "pkm", "peer")}
  # Every run (nested like configs/base.py); steps, warmup and eval_every come from the plan.
  c.overrides = {
      "model": {"ffw_layers": "middle", "dtype": "bfloat16", "remat": True},
      "train": {"batch_size": _c4.BATCH, "seq_len": _c4.SEQ_LEN,
                "learning_rate": _c4.LEARNING_RATE, "log_every": 100},
      "data": {"train_path": "tfds:c4/en:3.1.0",
               "eval_paths": _c4.eval_paths(), "eval_batches": 64},
      "checkpoint": {"every": 1000},
  }
  c.tolerance = 0.03
  c.min_steps = 1000
  c.warmup_fraction = _c4.WARMUP_FRACTION
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
