"""The paper's ablations at CPU scale, every run at the same training FLOPs (docs/ablations.md).

  python scripts/ablate.py --config=configs/ablations.py --workdir=/tmp/ablations
  python scripts/ablate.py --config=configs/ablations.py --workdir=/tmp/ablations --study=d_tables

Every run starts from configs/default.py, narrowed to 4 blocks of width 64 (4 heads,
d_ff 256; the middle block's FFW replaced) so that 2 CPU cores finish each study in
minutes, with a 4,096-piece tokenizer trained on WikiText-2 train (made on first use and
cached in the workdir), so the (un)embedding no longer holds most of the FLOPs. The
reference PEER layer is the quickstart's: 128² experts, 4 heads × top-8, query dim 64,
query batch-norm. `peer_ref` runs with three seeds: its spread is the seed noise that
every other difference is read against.
"""

import ml_collections

from configs.base import SHARED_DATA


def get_config():
  c = ml_collections.ConfigDict()
  c.base = "configs/default.py"
  c.results_dir = "docs/results/ablations"
  c.budget = 1e12  # training FLOPs per run (3 × forward), ~160 steps of 16×128 tokens
  c.tokenizer_vocab = 4096
  c.warmup_fraction = 0.05
  c.eval_set = "wikitext2_valid"
  # Overrides are (dotted key, value) pairs: ConfigDict keys cannot contain dots.
  c.overrides = tuple({
      "model.d_model": 64, "model.num_heads": 4, "model.d_ff": 256,
      "train.batch_size": 16, "train.seq_len": 128, "train.log_every": 20,
      "data.eval_batches": 16, "checkpoint.keep": 1,
      # The table settings every variant starts from, pinned: the defaults of configs/base.py
      # when these runs were made (the ablation then chose new defaults; docs/ablations.md).
      "train.table_lr_scale": 1.0, "train.table_lr_schedule": "follow",
      "data.eval_paths": (f"wikitext2_valid={SHARED_DATA}/wikitext-2/valid.txt,"
                          f"c4_sample={SHARED_DATA}/c4_en_sample/"
                          "c4-train.00000-of-01024.first1000.jsonl"),
  }.items())
  peer = lambda **kw: {"model.ffw": "peer", **{f"model.peer.{k}": v for k, v in kw.items()}}
  pkm = lambda **kw: {"model.ffw": "pkm", **{f"model.pkm.{k}": v for k, v in kw.items()}}
  moe = lambda **kw: {"model.ffw": "moe", **{f"model.moe.{k}": v for k, v in kw.items()}}
  variants = {
      "peer_ref": peer(),
      # (d) expert-table init, learning rate and weight decay (PEER)
      "peer_init_embed": peer(value_init="embed"),
      "peer_init_unscaled": peer(value_init="match_dense_unscaled"),
      "peer_table_lr4": {**peer(), "train.table_lr_scale": 4.0,
                         "train.table_lr_schedule": "decay_to_base"},
      "peer_table_no_wd": {**peer(), "train.table_weight_decay": 0.0},
      # (d) the same for PKM
      "pkm_ref": pkm(),
      "pkm_init_embed": pkm(value_init="embed"),
      "pkm_table_lr4": {**pkm(), "train.table_lr_scale": 4.0,
                        "train.table_lr_schedule": "decay_to_base"},
      # (e) MoE routing, 8 experts of d_ff 512, 2 expert FFWs computed per token in each
      "moe_expert_choice": moe(routing="expert_choice", capacity_factor=2.0),
      "moe_token_choice": moe(routing="token_choice", top_k=2, capacity_factor=1.0),
      "dense": {"model.ffw": "dense"},
      # (a) number of experts at 4 × 8 active
      "peer_n32": peer(num_experts=32**2),
      "peer_n256": peer(num_experts=256**2),
      # (b) heads × top-k at h·k = 32
      "peer_h1k32": peer(heads=1, top_k=32),
      "peer_h8k4": peer(heads=8, top_k=4),
      # (c) query batch-norm off
      "peer_no_bn": peer(query_norm="none"),
  }
  c.variants = {name: tuple(over.items()) for name, over in variants.items()}
  c.default_seeds = (0,)
  c.seeds = {"peer_ref": (0, 1, 2), "peer_table_lr4": (0, 1), "pkm_table_lr4": (0, 1)}
  # Run first (all their seeds): the seed noise everything else is read against.
  c.priority = ("peer_ref",)
  c.studies = {
      "a_num_experts": {"title": "(a) number of experts N at 4 heads × top-8",
                        "variants": ("peer_n32", "peer_ref", "peer_n256"),
                        "x": "model.peer.num_experts"},
      "b_heads_topk": {"title": "(b) heads × top-k at h·k = 32 (N = 128²)",
                       "variants": ("peer_h1k32", "peer_ref", "peer_h8k4"),
                       "x": "model.peer.heads"},
      "c_query_bn": {"title": "(c) query batch-norm (paper Table 2)",
                     "variants": ("peer_ref", "peer_no_bn")},
      "d_tables": {"title": "(d) expert-table init / LR / weight decay",
                   "variants": ("peer_ref", "peer_init_embed", "peer_init_unscaled",
                                "peer_table_lr4", "peer_table_no_wd", "pkm_ref",
                                "pkm_init_embed", "pkm_table_lr4")},
      "e_moe_routing": {"title": "(e) MoE expert choice (non-causal) vs token choice (causal)",
                        "variants": ("moe_expert_choice", "moe_token_choice", "dense",
                                     "peer_ref")},
  }
  return c
