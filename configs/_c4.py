"""Shared recipe of the paper-scale C4 configs (configs/c4_{dense,moe,pkm,peer}.py).

The paper's setting (He 2024, "Mixture of A Million Experts", isoFLOP comparisons): C4,
batch 128 sequences x 2048 tokens, the middle block's FFW replaced by the expert layer
(PEER: 1024² singleton experts, 8 heads, top-16, query dim 256, query batch-norm), at
compute budgets of 6e18 and 2e19 FLOPs.

Backbone sizes are derived, not copied: `compute_optimal_backbone(budget)` walks a family
of dense shapes (d_model = 768..2048, num_layers = d_model/85 rounded, head dim ~128,
d_ff = 4·d_model) and picks the one whose training tokens at that budget,
budget / (3 · flops_per_token), come closest to 20 tokens per parameter (Chinchilla's
compute-optimal ratio; flops from `peer_jax.flops`, attention counted as XLA does).
Every kind then uses that backbone, and `train.steps` is set so that the run spends the
budget with its own FLOPs per token (`steps_for_budget`).

  budget  backbone (dense)              params   tokens   tokens/param   steps
  6e18    d 1024, 12 layers, 8 heads    218M     4.26B    19.5           16241
  2e19    d 1280, 15 layers, 16 heads   379M     8.02B    21.2           30603
"""

import math

from configs import base

BATCH, SEQ_LEN = 128, 2048
BUDGETS = {"6e18": 6e18, "2e19": 2e19}
D_MODELS = (768, 1024, 1280, 1536, 1792, 2048)
TOKENS_PER_PARAM = 20.0


def _backbone(c, d_model: int):
  m = c.model
  m.d_model = d_model
  m.num_layers = max(2, round(d_model / 85))
  m.num_heads = 8 if d_model <= 1024 else 16
  m.d_ff = 4 * d_model


def compute_optimal_backbone(budget: float) -> int:
  """d_model of the dense family member closest to 20 tokens/parameter at `budget`."""
  from peer_jax import flops
  best = None
  for d in D_MODELS:
    c = base.get_config()
    _backbone(c, d)
    c.model.ffw = "dense"
    tokens = budget / (3 * flops.flops_per_token(c.model, SEQ_LEN)["total"])
    ratio = tokens / flops.param_counts(c.model)["active"]
    score = abs(math.log(ratio / TOKENS_PER_PARAM))
    if best is None or score < best[0]:
      best = (score, d)
  return best[1]


def steps_for_budget(model_cfg, budget: float) -> int:
  from peer_jax import flops
  per_step = 3 * flops.flops_per_token(model_cfg, SEQ_LEN)["total"] * BATCH * SEQ_LEN
  return max(1, round(budget / per_step))


def get_config(kind: str, budget_name: str | None):
  budget_name = budget_name or "6e18"
  if budget_name not in BUDGETS:
    raise ValueError(f"unknown compute budget {budget_name!r}; expected one of "
                     f"{', '.join(BUDGETS)} (e.g. --config=configs/c4_{kind}.py:2e19)")
  budget = BUDGETS[budget_name]
  c = base.get_config()
  _backbone(c, compute_optimal_backbone(budget))
  m = c.model
  m.ffw = kind
  m.ffw_layers = "middle"
  m.dtype = "bfloat16"
  m.remat = True
  m.peer.num_experts, m.peer.heads, m.peer.top_k, m.peer.query_dim = 1024**2, 8, 16, 256
  m.peer.query_norm = "batchnorm"
  m.moe.num_experts, m.moe.d_ff, m.moe.capacity_factor = 128, 0, 1.0
  m.pkm.num_memories, m.pkm.heads, m.pkm.top_k, m.pkm.key_dim = 1024**2, 8, 32, 256
  t = c.train
  t.batch_size, t.seq_len = BATCH, SEQ_LEN
  t.steps = steps_for_budget(m, budget)
  t.learning_rate = 1e-3
  t.warmup_steps = min(1000, t.steps // 10)
  t.log_every, t.eval_every = 100, 1000
  d = c.data
  d.train_path = "tfds:c4/en:3.1.0"
  d.eval_paths = "c4_valid=tfds:c4/en:3.1.0[validation]"
  d.eval_batches = 16
  c.checkpoint.every = 1000
  return c
