"""The quickstart model with a Memory+ layer (128² memories, 4 heads, top-8, gated output)
in the middle block: configs/pkm.py's memory with Memory+'s SiLU gate and qk-norm.

`--config.model.ffw_layers=1,2 --config.model.memory_plus.shared_values=True` puts one
value pool behind two blocks (docs/peer_layer.md, "Memory+").
"""

import ml_collections

from configs import default
from peer_jax.kinds import memory_plus


def get_config():
  c = default.get_config()
  c.model.ffw = "memory_plus"
  c.model.memory_plus = s = ml_collections.ConfigDict(memory_plus.default_config())
  s.num_memories, s.heads, s.top_k, s.key_dim = 128**2, 4, 8, 64
  return c
