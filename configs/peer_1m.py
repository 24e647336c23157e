"""One PEER layer of 1024² experts at d_model 256 (2 × 2^20 × 256 table parameters).

The scale check of the PEER-layer issue: a few steps at batch 4 × 512 on 2 CPU cores stay
within 12 GiB of memory. The paper's layer: h = 8 heads, top-16, query dim 256, query BN.
"""

from configs import base


def get_config():
  c = base.get_config()
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.d_ff = 256, 4, 4, 1024
  m.ffw = "peer"
  m.ffw_layers = "middle"
  m.peer.num_experts = 1024**2
  m.peer.heads, m.peer.top_k, m.peer.query_dim = 8, 16, 256
  t = c.train
  t.steps, t.batch_size, t.seq_len = 20, 4, 512
  t.warmup_steps, t.log_every, t.eval_every = 2, 1, 0
  c.checkpoint.every = 0
  return c
