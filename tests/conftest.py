import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import peer_jax  # noqa: E402,F401  (sets the Flax flags before any module is built)
from configs import base  # noqa: E402


def tiny_config(ffw: str = "dense"):
  """A model small enough that a train step takes milliseconds on CPU (real tokenizer)."""
  c = base.get_config()
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.d_ff = 32, 2, 2, 64
  m.ffw = ffw
  m.peer.num_experts, m.peer.heads, m.peer.top_k, m.peer.query_dim = 16**2, 2, 4, 16
  m.moe.num_experts = 4
  m.pkm.num_memories, m.pkm.heads, m.pkm.top_k, m.pkm.key_dim = 16**2, 2, 4, 16
  mp = m.memory_plus  # configs/base.py holds it (from the kind's declared defaults)
  mp.num_memories, mp.heads, mp.top_k, mp.key_dim = 16**2, 2, 4, 16
  t = c.train
  t.steps, t.batch_size, t.seq_len = 4, 4, 32
  t.warmup_steps, t.log_every, t.eval_every = 1, 1, 0
  c.data.eval_batches = 2
  return c


@pytest.fixture
def cfg():
  return tiny_config()


@pytest.fixture(scope="session")
def repo():
  return REPO
