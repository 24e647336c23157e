"""The README quickstart model: a small PEER transformer on WikiText-2, minutes on 2 CPU cores.

Four blocks of width 128; the middle block's FFW (block 1, 0-based) is replaced by a PEER
layer of 128² = 16,384 single-neuron experts, 4 heads × top-8 each (32 active experts per
token), with query batch-norm as in the paper. The other blocks keep a dense GELU FFW.
"""

from configs import base


def get_config():
  c = base.get_config()
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.d_ff = 128, 4, 4, 512
  m.ffw = "peer"
  m.ffw_layers = "middle"
  m.peer.num_experts = 128**2
  m.peer.heads = 4
  m.peer.top_k = 8
  m.peer.query_dim = 64
  m.moe.num_experts = 8
  m.pkm.num_memories, m.pkm.heads, m.pkm.top_k, m.pkm.key_dim = 128**2, 4, 8, 64
  t = c.train
  t.steps, t.batch_size, t.seq_len = 300, 8, 128
  t.learning_rate, t.warmup_steps = 3e-3, 30
  t.log_every, t.eval_every = 20, 100
  c.checkpoint.every = 100
  return c
