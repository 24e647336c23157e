"""Every config key peer_jax knows, with its default. Named experiments start from here.

docs/configuration.md documents each key; tests/test_config.py checks the two agree.
"""

import os

import ml_collections

# The bundled corpora live in ../shared/data beside the repository; PEER_JAX_DATA overrides.
SHARED_DATA = os.environ.get(
    "PEER_JAX_DATA",
    os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                  "shared", "data")))


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 32768
  m.d_model = 256
  m.num_layers = 4
  m.num_heads = 4
  m.d_ff = 1024
  m.ffw_activation = "gelu"
  m.ffw = "dense"
  m.ffw_layers = "middle"
  m.tie_embeddings = False
  m.dtype = "float32"
  m.remat = False
  m.rope_theta = 10000.0

  m.peer = p = ml_collections.ConfigDict()
  p.num_experts = 1024**2
  p.heads = 8
  p.top_k = 16
  p.query_dim = 256
  p.query_norm = "batchnorm"
  p.per_head_keys = False
  p.router = "softmax"
  p.activation = "gelu"
  p.glu = False
  p.placement = "replace"
  p.chunk_size = 512
  p.value_init = "match_dense"  # match_dense | match_dense_unscaled | embed (docs/peer_layer.md)
  p.kernel = "auto"  # auto | xla | pallas | cpu_ffi (docs/peer_layer.md, which runs where)

  m.moe = e = ml_collections.ConfigDict()
  e.num_experts = 128
  e.d_ff = 0  # 0: each expert is the size of the dense FFW (model.d_ff), as in the paper
  e.routing = "expert_choice"  # expert_choice (the paper's baseline; NOT causal) | token_choice
  e.capacity_factor = 2.0  # Zhou et al.'s standard for expert choice
  e.top_k = 2  # token_choice: experts per token
  e.aux_loss_coef = 0.01  # token_choice: Switch load-balancing loss weight

  m.pkm = k = ml_collections.ConfigDict()
  k.num_memories = 1024**2
  k.heads = 8
  k.top_k = 32
  k.key_dim = 256
  k.query_norm = "batchnorm"
  k.value_init = "match_dense"
  k.kernel = "auto"  # auto | xla | pallas | cpu_ffi: the embedding bag's (docs/peer_layer.md)

  # Kinds that declare their own defaults (peer_jax/kinds: Memory+) get their section here,
  # so every config knows their keys (command-line and sweep overrides need a key to set)
  # without an edit to this file per kind.
  from peer_jax import kinds
  for kind in kinds.all_kinds():
    if kind.defaults is not None and kind.section not in m:
      m[kind.section] = ml_collections.ConfigDict(kind.defaults())

  c.train = t = ml_collections.ConfigDict()
  t.steps = 1000
  t.batch_size = 16
  t.seq_len = 256
  t.grad_accum_steps = 1
  t.learning_rate = 1e-3
  t.warmup_steps = 100
  t.min_lr_ratio = 0.1
  t.weight_decay = 0.1
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.grad_clip = 1.0
  # Expert tables (PEER u/v/g, PKM values): their own optimizer settings (docs/peer_layer.md).
  t.table_optimizer = "adamw"  # adamw | lazy_adam | sgd | adafactor
  # 4x decaying to 1x (UltraMem's rule): chosen by docs/ablations.md, study (d).
  t.table_lr_scale = 4.0
  t.table_lr_schedule = "decay_to_base"  # follow | decay_to_base | constant
  t.table_weight_decay = -1.0  # -1: train.weight_decay; 0: no decay on the tables
  t.log_every = 10
  # Per-step experts/block_I/usage and unevenness (PEER, PKM): a histogram of every
  # retrieval into the N experts, each step. On TPU XLA charges it ~7e10 bytes per device
  # for the 6e18 PEER model (docs/scaling.md); False leaves it to the evaluations.
  t.expert_stats = True
  t.eval_every = 200

  c.data = d = ml_collections.ConfigDict()
  d.tokenizer = f"{SHARED_DATA}/tokenizers/c4_en_32k_spm.model"
  d.train_path = f"{SHARED_DATA}/wikitext-2/train.txt"
  d.text_format = "lines"
  d.tfds_data_dir = ""
  d.num_threads = 0
  d.prefetch = 2
  d.add_bos = True
  d.add_eos = True
  d.shuffle = True
  d.shuffle_buffer = 256  # streaming sources: documents each batch row window-shuffles
  d.bad_records = "error"  # error | skip (skip and count bad records of streaming sources)
  d.eval_paths = (f"wikitext2_valid={SHARED_DATA}/wikitext-2/valid.txt,"
                  f"c4_sample={SHARED_DATA}/c4_en_sample/c4-train.00000-of-01024.first1000.jsonl")
  d.eval_batches = 8

  c.checkpoint = ck = ml_collections.ConfigDict()
  ck.every = 500
  ck.keep = 3
  ck.keep_period = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
  ck.async_save = True
  ck.init_from = ""  # a workdir whose latest params start this run (fresh optimizer)

  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = -1
  ms.fsdp = 1
  ms.tensor = 1
  # Multi-slice pods: how many slices each axis spans over the data-centre network (DCN);
  # the sizes above are then per slice. 1 = single slice.
  ms.dcn_data = 1
  ms.dcn_fsdp = 1
  ms.dcn_tensor = 1

  c.sharding = sh = ml_collections.ConfigDict()
  # Logical axis name -> mesh axes. Edit this table, not the model, to change parallelism.
  sh.rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("vocab", "tensor"),
      ("experts", None),  # PEER/PKM table rows: keep None (the bank shards along D)
      ("expert_embed", "tensor"),
      ("heads_q", "tensor"),  # PEER/PKM query network output (heads x query dim)
      ("sub_keys", None),
      ("key_half", None),
      ("key_heads", None),
      ("length", None),
      ("head_dim", None),
  )
  return c
