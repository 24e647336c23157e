"""Pallas expert kernels (peer_jax/ops/pallas_experts.py) against the naive reference.

Run in Pallas interpret mode on CPU (what `interpret=None` picks there). Interpreting a
kernel costs seconds of tracing and XLA compile per shape, so the default suite keeps one
forward case and the argument checks; values + gradients over the case matrix are
`slow` (`pytest -m slow tests/test_pallas.py`, ~2-4 min on a 2-core VM).

Tolerances: the kernels compute in f32 whatever the table dtype, so against the f32
reference (bf16 tables upcast) values and gradients agree to f32 rounding of sums of a
few dozen terms: rtol = atol = 1e-4 (observed ~1e-6 relative). Table gradients of bf16
tables come back in bf16: rtol 1e-2 / atol 1e-2 · max|g|.
"""

import pytest

import jax
import jax.numpy as jnp

from tests.expert_cases import assert_close, check_values_and_gradients, expert_inputs
from peer_jax.ops import peer_experts_reference
from peer_jax.ops.pallas_experts import peer_experts_pallas


def test_forward_matches_reference():
  # T = 20 is not a multiple of the 8-token block; N = 64 with 8 slots per token repeats
  # experts within and across tokens.
  x, idx, w, u, v = expert_inputs(0, 20, 32, 2, 4, 64)
  y = peer_experts_pallas(x, idx, w, u, v, block_tokens=8)
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert_close(y, peer_experts_reference(x, idx, w, u, v))


def test_argument_checks():
  x, idx, w, u, v = expert_inputs(0, 8, 32, 1, 8, 16)
  with pytest.raises(ValueError, match="must be"):
    peer_experts_pallas(x, idx, w[:, :, :4], u, v)
  with pytest.raises(ValueError, match="D % 128"):
    peer_experts_pallas(x, idx, w, u, v, interpret=False)
  with pytest.raises(ValueError, match="multiples of 8"):
    peer_experts_pallas(x, idx, w, u, v, block_tokens=12)


_CASES = [
    # (T, D, H, K, N, table dtype, block_tokens, block_rows, chunk_pairs, activation)
    (16, 32, 2, 4, 64, jnp.float32, 8, 16, 8, jax.nn.gelu),     # T divisible by the block
    (20, 32, 2, 4, 72, jnp.float32, 8, 16, 8, jax.nn.relu),     # T and N not divisible
    (40, 128, 1, 8, 512, jnp.float32, 16, 64, 16, jax.nn.gelu),  # D = 128, larger N
    (24, 32, 2, 4, 64, jnp.bfloat16, 8, 16, 8, jax.nn.gelu),    # bf16 tables
    (18, 128, 2, 4, 256, jnp.bfloat16, 16, 256, 128, jax.nn.gelu),  # bf16, default chunk
]


@pytest.mark.slow
@pytest.mark.parametrize("case", _CASES, ids=lambda c: f"T{c[0]}-D{c[1]}-N{c[4]}-"
                         f"{jnp.dtype(c[5]).name}-{c[9].__name__}")
def test_values_and_gradients_match_reference(case):
  t, d, h, k, n, dt, bt, br, chunk, act = case
  pallas = lambda *a: peer_experts_pallas(*a, block_tokens=bt, block_rows=br, chunk_pairs=chunk)
  check_values_and_gradients(pallas, expert_inputs(1, t, d, h, k, n, dt), dt, act)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_row_kernels_of_the_sharded_bank_match_gathers(dtype):
  # ops/pallas_rows.py (the bank's per-shard gathers on TPU), interpret mode, against
  # jnp.take: a padded last token block, repeated ids, 16-bit tables through the word view.
  import numpy as np
  from peer_jax.ops.pallas_rows import pair_dots, weighted_rows
  rng = np.random.default_rng(7)
  t, m, n, d = 21, 8, 32, 16
  table = jnp.asarray(rng.normal(size=(n, d)), dtype)
  idx = jnp.asarray(rng.integers(0, n, size=(t, m)), jnp.int32).at[0, :2].set(5)
  src = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  coef = jnp.asarray(rng.normal(size=(t, m)), jnp.float32)
  rows = jnp.take(table, idx, axis=0).astype(jnp.float32)
  got_d = pair_dots(table, idx, src, block_tokens=8, ring=3, interpret=True)
  got_w = weighted_rows(table, idx, coef, block_tokens=8, ring=3, interpret=True)
  assert got_d.shape == (t, m) and got_w.shape == (t, d)
  np.testing.assert_allclose(got_d, jnp.einsum("td,tmd->tm", src, rows), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_w, jnp.einsum("tm,tmd->td", coef, rows), rtol=1e-5, atol=1e-5)
