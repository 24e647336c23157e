"""Tests of the performance-oriented pieces: table optimizers (peer_jax.optim) and the
properties of the fast ops that the benchmarks rely on. No wall-clock assertions."""

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from peer_jax import optim
from peer_jax.ops import peer_experts


def _rand(rng, shape, scale=1.0):
  return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lazy_adam_equals_adamw_when_every_row_is_touched(weight_decay):
  rng = np.random.default_rng(0)
  params = {"t": _rand(rng, (16, 4))}
  sched = optax.linear_schedule(1e-2, 1e-3, 5)
  dense = optax.adamw(sched, b1=0.9, b2=0.95, eps=1e-8, weight_decay=weight_decay)
  lazy = optim.lazy_adam(sched, max_rows=16, b1=0.9, b2=0.95, eps=1e-8,
                         weight_decay=weight_decay)
  pd, pl = params, params
  sd, sl = dense.init(pd), lazy.init(pl)
  for _ in range(4):
    g = {"t": _rand(rng, (16, 4))}
    ud, sd = dense.update(g, sd, pd)
    ul, sl = jax.jit(lazy.update)(g, sl, pl)
    pd, pl = optax.apply_updates(pd, ud), optax.apply_updates(pl, ul)
    np.testing.assert_allclose(pl["t"], pd["t"], rtol=1e-5, atol=1e-6)


def test_lazy_adam_leaves_untouched_rows_alone():
  rng = np.random.default_rng(1)
  p = _rand(rng, (32, 4))
  lazy = optim.lazy_adam(1e-2, max_rows=8, weight_decay=0.1)
  state = lazy.init(p)
  touched = np.array([3, 7, 20])
  for _ in range(3):
    g = jnp.zeros_like(p).at[touched].set(_rand(rng, (3, 4)))
    u, state = jax.jit(lazy.update)(g, state, p)
    p_new = optax.apply_updates(p, u)
    untouched = np.setdiff1d(np.arange(32), touched)
    np.testing.assert_array_equal(p_new[untouched], p[untouched])
    assert np.all(np.asarray(state.mu)[untouched] == 0)
    assert np.all(np.abs(np.asarray(p_new[touched] - p[touched])) > 0)
    p = p_new
  # Same as dense AdamW restricted to the touched rows (they were touched every step).
  dense = optax.adamw(1e-2, weight_decay=0.1)
  rng = np.random.default_rng(1)
  q = _rand(rng, (32, 4))[touched]
  s = dense.init(q)
  for _ in range(3):
    g = _rand(rng, (3, 4))
    u, s = dense.update(g, s, q)
    q = optax.apply_updates(q, u)
  np.testing.assert_allclose(p[touched], q, rtol=1e-5, atol=1e-6)


def test_touched_rows_pads_with_n_and_ignores_negative_zero():
  g = jnp.zeros((10, 3)).at[jnp.array([2, 5])].set(1.0).at[7].set(-0.0)
  rows = optim.touched_rows(g, 4)
  np.testing.assert_array_equal(rows, [2, 5, 10, 10])


@pytest.mark.parametrize("kind", optim.TABLE_KINDS)
def test_table_aware_optimizer_on_peer_params(kind):
  from peer_jax.layers.peer import PEER
  layer = PEER(16, num_experts=64, heads=2, top_k=4, query_dim=8, query_norm="none",
               rngs=nnx.Rngs(0))
  _, params, _ = nnx.split(layer, nnx.Param, ...)
  labels = optim.table_labels(params)
  flat = {"/".join(optim._path_names(p)): l
          for p, l in jax.tree_util.tree_flatten_with_path(labels)[0]}
  assert {k for k, l in flat.items() if l == "table"} == {
      k for k in flat if k.split("/")[0] in ("u_ND", "v_ND")}, flat
  rest = optax.adamw(1e-3)
  tx = optim.table_aware_optimizer(rest, table_kind=kind, table_learning_rate=1e-2,
                                   max_rows=64)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, updates)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)):
    assert a.shape == b.shape and np.all(np.isfinite(np.asarray(a)))
    assert not np.allclose(a, b)


def test_table_transform_rejects_unknown_kind():
  with pytest.raises(ValueError):
    optim.table_transform("adagrad", 1e-3)


def test_peer_experts_untouched_gradient_rows_compare_equal_to_zero():
  # Both table-gradient accumulators start from (signed) zeros; untouched rows must be == 0
  # and invisible to the row-sparse optimizer.
  rng = np.random.default_rng(2)
  T, D, N = 20, 8, 64
  x, dy = _rand(rng, (T, D)), _rand(rng, (T, D))
  idx = jnp.asarray(rng.integers(0, 8, (T, 2, 2)), jnp.int32)
  w = _rand(rng, (T, 2, 2))
  u, v = _rand(rng, (N, D)), _rand(rng, (N, D))
  _, vjp = jax.vjp(lambda u, v: peer_experts(x, idx, w, u, v, chunk_size=8), u, v)
  du, dv = jax.jit(vjp)(dy)
  for g in (du, dv):
    assert np.all(np.asarray(g)[8:] == 0)
    np.testing.assert_array_equal(optim.touched_rows(g, N)[:8] < 8, True)


def test_lazy_adam_apply_in_place_matches_optax_form():
  rng = np.random.default_rng(3)
  p = _rand(rng, (32, 4))
  lazy = optim.lazy_adam(1e-2, max_rows=8, b1=0.9, b2=0.95, weight_decay=0.1)
  state = lazy.init(p)
  q, mu, nu, count = p, jnp.zeros_like(p), jnp.zeros_like(p), jnp.zeros((), jnp.int32)
  for _ in range(3):
    g = jnp.zeros_like(p).at[np.array([1, 4, 30])].set(_rand(rng, (3, 4)))
    u, state = lazy.update(g, state, p)
    p = optax.apply_updates(p, u)
    q, mu, nu = optim.lazy_adam_apply(q, mu, nu, g, count, 1e-2, max_rows=8, b1=0.9, b2=0.95,
                                      weight_decay=0.1)
    count = count + 1
    np.testing.assert_allclose(q, p, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(mu, state.mu, rtol=1e-6, atol=1e-7)


def _peer_layer_temp_bytes(num_tokens, chunk_size):
  from peer_jax.layers.peer import PEER
  D, H, K, Q, N = 32, 4, 8, 16, 256 ** 2
  layer = PEER(D, num_experts=N, heads=H, top_k=K, query_dim=Q, query_norm="none",
               chunk_size=chunk_size, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def step(params, x, dy):
    y, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p, rest)(x, train=True)[0], params, x)
    return y, vjp(dy)

  x = jax.ShapeDtypeStruct((1, num_tokens, D), jnp.float32)
  compiled = jax.jit(step).lower(params, x, x).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_peer_layer_temporaries_do_not_grow_like_the_score_matrices():
  # Unchunked, each token adds 2 halves x H x n f32 sub-key scores (8 KiB here) to the
  # temporaries; chunked retrieval + chunked experts keep only per-token activations
  # (queries, router outputs: well under a quarter of that).
  small, large = 512, 4096
  score_growth = (large - small) * 2 * 4 * 256 * 4
  chunked = _peer_layer_temp_bytes(large, 128) - _peer_layer_temp_bytes(small, 128)
  assert chunked < 0.25 * score_growth, (chunked, score_growth)
  unchunked = _peer_layer_temp_bytes(large, large) - _peer_layer_temp_bytes(small, large)
  assert unchunked > 0.9 * score_growth  # the test can tell the difference
