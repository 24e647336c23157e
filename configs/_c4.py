"""The paper-scale C4 recipe, defined once: backbone family, expert layers, training, eval sets.

Two kinds of config are built from it (docs/scaling.md, docs/sweeps.md):

* SINGLE RUNS: configs/c4_{dense,moe,pkm,peer}.py:BUDGET. Every kind runs on the *dense*
  compute-optimal backbone of the budget (below), for the steps that spend the budget at its
  own FLOPs per token. That gives four runs at equal FLOPs on one backbone. It is NOT the
  procedure behind the paper's Table 1, so its numbers are not Table 1's: the paper reports each
  method at *its own* isoFLOP optimum, which need not be the dense one.
* THE PAPER'S TABLE 1 PROCEDURE: configs/isoflop_paper.py, the isoFLOP sweep. Every kind runs
  at every size of FAMILY (one window of sizes per budget, SWEEP_WINDOWS) and the minimum of
  each kind's curve is reported.
Every single run is one point of that sweep: same backbone, expert layer, batch, steps, LR
and warmup (tests/test_paper_configs.py checks this).

A single run (each configs/c4_KIND.py says only what is particular to its kind):

  python scripts/train.py --config=configs/c4_KIND.py:6e18 --workdir=runs/c4_KIND_6e18
  python scripts/train.py --config=configs/c4_KIND.py:2e19 --workdir=runs/c4_KIND_2e19

batch 128 x 2048 tokens on C4 (tfds:c4/en:3.1.0), bf16, remat; evaluated on C4 validation and,
with $PEER_EVAL_DATA, the paper's other sets (below; docs/evaluation.md). Meshes and per-chip
memory on TPU pods: docs/scaling.md (e.g. --config.mesh.tensor=4).

Stated by the paper (He 2024, arXiv 2407.04153, §3) and used here: C4; batch 128 sequences
x 2048 tokens; budgets 6e18 and 2e19 FLOPs; the middle block's FFW replaced by the expert
layer; PEER with 1024² experts, h = 8, k = 16, query batch-norm; PKM with 1024² memories, h = 8,
k = 32, query batch-norm; MoE with expert-choice routing and 128 experts, each the size of the
dense FFW.

Our choices (the paper does not state them): the tokenizer (configs/base.py's 32k
SentencePiece), the optimizer and LR schedule (base's AdamW and schedule, LR 1e-3, warmup
WARMUP_FRACTION of the steps), the widths and depths (FAMILY: d_model 640 ... 2048,
num_layers = round(d_model / 85), head dim 64, d_ff = 4·d_model), the PEER query dim and the
PKM key dim (256 each), the MoE capacity factor (base's 2.0, Zhou et al.'s standard for
expert choice), bf16 and remat, and which eval sets exist here (eval_paths()).
Expert-choice MoE is NOT causal: a token's routing depends on later tokens of its sequence,
so its perplexities are not comparable with a causal model's (docs/configuration.md,
model.moe.routing; set it to token_choice for a causal MoE).

The dense compute-optimal backbone, `compute_optimal_backbone(budget)`: the FAMILY member whose
training tokens at that budget, budget / (3 · flops_per_token), come closest to 20 tokens per
parameter (Chinchilla's ratio; FLOPs from `peer_jax.flops`, attention counted as XLA does):

  budget  backbone (dense)              params   tokens   tokens/param   steps
  6e18    d 1024, 12 layers, 16 heads   218M     4.26B    19.5           16241
  2e19    d 1280, 15 layers, 20 heads   379M     8.02B    21.2           30603

Eval sets (`eval_paths()`): C4 validation from TFDS always; WikiText-103, the Pile, the
Curation Corpus and LAMBADA (last-word task *and* plain perplexity) from local files when
$PEER_EVAL_DATA names a directory holding them (LOCAL_EVAL_FILES; docs/evaluation.md).
"""

import math
import os

from configs import base

BATCH, SEQ_LEN = 128, 2048
BUDGETS = {"6e18": 6e18, "2e19": 2e19}
TOKENS_PER_PARAM = 20.0
LEARNING_RATE = 1e-3  # our choice; the paper does not state its optimizer settings
WARMUP_FRACTION = 0.02  # our choice; the same rule as the sweep's warmup_fraction

# The backbone family (our choice: the paper gives no widths or depths). Every d_model is a
# multiple of 128, so HEAD_DIM 64 gives an even head count, divisible by 4 (mesh.tensor=4)
# at every multiple of 256.
FAMILY_D_MODELS = (640, 768, 896, 1024, 1280, 1536, 1792, 2048)
HEAD_DIM = 64
D_FF_RATIO = 4


def num_layers_for(d_model: int) -> int:
  return max(2, round(d_model / 85))


FAMILY = tuple((d, num_layers_for(d)) for d in FAMILY_D_MODELS)  # (d_model, num_layers)
# isoflop_paper.py's sizes per budget: (start, stop) slices of FAMILY, in BUDGETS order, seven
# sizes centred on the dense optimum (6e18: 640 ... 1792; 2e19: 768 ... 2048).
SWEEP_WINDOWS = ((0, 7), (1, 8))

# The paper's eval sets that a local file can provide: name -> candidate paths under
# $PEER_EVAL_DATA, the first that exists is used. `lambada` is scored as the last-word task
# (peer_jax.evaluate.task_of: names starting with "lambada"); the same file is also scored as
# plain perplexity under LAMBADA_LM_NAME.
EVAL_DATA_ENV = "PEER_EVAL_DATA"
LOCAL_EVAL_FILES = {
    "wikitext103": ("wikitext-103/valid.jsonl", "wikitext-103-raw/wiki.valid.raw"),
    "pile": ("pile/val.jsonl", "pile/val.jsonl.zst"),
    "curation": ("curation_corpus/valid.jsonl",),
    "lambada": ("lambada/lambada_test.jsonl",),
}
LAMBADA_LM_NAME = "lm_lambada"
C4_VALID = "c4_valid=tfds:c4/en:3.1.0[validation]"


def set_backbone(c, d_model: int, num_layers: int):
  """The FAMILY shape (d_model, num_layers) on config c (heads = d_model / HEAD_DIM)."""
  m = c.model
  m.d_model, m.num_layers = d_model, num_layers
  m.num_heads = d_model // HEAD_DIM
  m.d_ff = D_FF_RATIO * d_model


def compute_optimal_backbone(budget: float) -> tuple[int, int]:
  """(d_model, num_layers) of the FAMILY member closest to 20 tokens/parameter at `budget`."""
  from peer_jax import flops
  best = None
  for d, layers in FAMILY:
    c = base.get_config()
    set_backbone(c, d, layers)
    c.model.ffw = "dense"
    tokens = budget / (3 * flops.flops_per_token(c.model, SEQ_LEN)["total"])
    ratio = tokens / flops.param_counts(c.model)["active"]
    score = abs(math.log(ratio / TOKENS_PER_PARAM))
    if best is None or score < best[0]:
      best = (score, (d, layers))
  return best[1]


def steps_for_budget(model_cfg, budget: float) -> int:
  """The sweep planner's rule: round(budget / (3 · forward FLOPs per token · tokens per step))."""
  from peer_jax import flops
  per_step = 3 * flops.flops_per_token(model_cfg, SEQ_LEN)["total"] * BATCH * SEQ_LEN
  return max(1, round(budget / per_step))


def eval_paths(environ=None) -> str:
  """data.eval_paths: C4 validation (TFDS), plus the LOCAL_EVAL_FILES found under
  $PEER_EVAL_DATA (nothing more, and no error, when it is unset or names no directory)."""
  environ = os.environ if environ is None else environ
  sets = [C4_VALID]
  root = environ.get(EVAL_DATA_ENV, "")
  if root and os.path.isdir(root):
    root = os.path.abspath(os.path.expanduser(root))
    if any(ch in root for ch in ",=@[]"):
      raise ValueError(f"${EVAL_DATA_ENV}={root}: the eval-set syntax (name=PATH,...) cannot "
                       f"hold a path with ',', '=', '@' or brackets; use another directory")
    for name, candidates in LOCAL_EVAL_FILES.items():
      path = next((os.path.join(root, p) for p in candidates
                   if os.path.isfile(os.path.join(root, p))), None)
      if path is None:
        continue
      sets.append(f"{name}={path}")
      if name == "lambada":
        sets.append(f"{LAMBADA_LM_NAME}={path}")
  return ",".join(sets)


def model_settings(kind: str) -> dict:
  """Flat model overrides of one kind: the paper's expert-layer settings and our choices."""
  out = {"model.ffw": kind, "model.ffw_layers": "middle", "model.dtype": "bfloat16",
         "model.remat": True}
  if kind == "peer":
    out.update({"model.peer.num_experts": 1024**2, "model.peer.heads": 8,
                "model.peer.top_k": 16, "model.peer.query_norm": "batchnorm",
                "model.peer.query_dim": 256})  # query dim: our choice, not stated in the paper
  elif kind == "pkm":
    out.update({"model.pkm.num_memories": 1024**2, "model.pkm.heads": 8,
                "model.pkm.top_k": 32, "model.pkm.query_norm": "batchnorm",
                "model.pkm.key_dim": 256})  # key dim: our choice, not stated in the paper
  elif kind == "moe":
    # Expert choice (NOT causal), 128 experts of d_ff (moe.d_ff 0); capacity factor: base's
    # 2.0 (our choice, Zhou et al.'s standard; the paper does not state one).
    out.update({"model.moe.num_experts": 128, "model.moe.d_ff": 0,
                "model.moe.routing": "expert_choice"})
  return out


def get_config(kind: str, budget_name: str | None):
  budget_name = budget_name or "6e18"
  if budget_name not in BUDGETS:
    raise ValueError(f"unknown compute budget {budget_name!r}; expected one of "
                     f"{', '.join(BUDGETS)} (e.g. --config=configs/c4_{kind}.py:2e19)")
  budget = BUDGETS[budget_name]
  c = base.get_config()
  set_backbone(c, *compute_optimal_backbone(budget))
  for key, value in model_settings(kind).items():
    *parents, leaf = key.split(".")
    node = c
    for part in parents:
      node = node[part]
    node[leaf] = value
  t = c.train
  t.batch_size, t.seq_len = BATCH, SEQ_LEN
  t.steps = steps_for_budget(c.model, budget)
  t.learning_rate = LEARNING_RATE
  t.warmup_steps = max(1, round(WARMUP_FRACTION * t.steps))
  t.log_every, t.eval_every = 100, 1000
  d = c.data
  d.train_path = "tfds:c4/en:3.1.0"
  d.eval_paths = eval_paths()
  d.eval_batches = 16
  c.checkpoint.every = 1000
  return c
