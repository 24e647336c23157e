"""Tests of the sparse FFW layers (PEER, MoE, PKM) and of peer_jax.expert_stats.

Every layer is checked against a brute-force computation written here from the
definitions (dense scores over all N keys, naive gathers, explicit loops), and for
finite values and gradients in all its variants.
"""

import math

import numpy as np
import pytest

import peer_jax  # noqa: F401  (sets flax_always_shard_variable=False before any layer)
import jax
import jax.numpy as jnp
from flax import nnx

from peer_jax import expert_stats as es
from peer_jax.layers.ffw import DenseFFW
from peer_jax.layers.moe import MoE, expert_capacity
from peer_jax.layers.peer import PEER
from peer_jax.layers.pkm import PKM, embedding_bag, embedding_bag_reference

D, N, H, K, QD = 16, 64, 2, 4, 8  # n = 8 sub-keys per half
B, T = 2, 8


def _x(seed=0, shape=(B, T, D)):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _peer(seed=0, **kw):
  cfg = dict(num_experts=N, heads=H, top_k=K, query_dim=QD, chunk_size=5)
  cfg.update(kw)
  return PEER(D, **cfg, rngs=nnx.Rngs(seed))


# One jitted apply for all layers: eager op-by-op dispatch is several times slower on CPU.
# nnx.jit carries the BatchNorm statistics updates back into the module.
_apply = nnx.jit(lambda layer, x, train: layer(x, train=train), static_argnames="train")


def _grads(layer, x, train=True):
  """Gradients of a scalar loss w.r.t. all params and x (BatchStat updates discarded)."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x):
    # flax 0.12: merging inside a JAX transform needs copy=True, else the BatchNorm
    # statistics update raises TraceContextError ("different trace level").
    y, aux = nnx.merge(graphdef, params, rest, copy=True)(x, train=train)
    return jnp.sum(jnp.sin(y))

  return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)


def _all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(tree))


def _gelu_np(z):
  """jax.nn.gelu (tanh approximation, its default) in numpy."""
  z = np.asarray(z, np.float64)
  return 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z ** 3)))


# ----------------------------------------------------------------------------- PEER


def test_peer_shapes_and_aux():
  layer = _peer()
  y, aux = _apply(layer, _x(), False)
  assert y.shape == (B, T, D) and y.dtype == jnp.float32
  assert set(aux) == {"expert_indices", "expert_weights"}
  assert aux["expert_indices"].shape == (B, T, H, K) and aux["expert_indices"].dtype == jnp.int32
  assert aux["expert_weights"].shape == (B, T, H, K)
  assert aux["expert_weights"].dtype == jnp.float32
  idx = np.asarray(aux["expert_indices"])
  assert idx.min() >= 0 and idx.max() < N
  np.testing.assert_allclose(np.asarray(aux["expert_weights"]).sum(-1), 1.0, rtol=1e-5)
  assert layer.u_ND.shape == (N, D) and layer.v_ND.shape == (N, D)
  assert layer.u_ND.get_metadata()["out_sharding"] == ("experts", "expert_embed")


def test_peer_bfloat16_compute():
  y, aux = _apply(_peer(dtype=jnp.bfloat16), _x(), True)
  assert y.dtype == jnp.bfloat16 and aux["expert_weights"].dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


_VARIANTS = [
    dict(query_norm="batchnorm"),
    dict(query_norm="layernorm"),
    dict(query_norm="rmsnorm"),
    dict(query_norm="none"),
    dict(per_head_keys=True),
    dict(router="sigmoid"),
    dict(activation="relu"),
    dict(glu=True),
]


@pytest.mark.parametrize("kw", _VARIANTS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_peer_variants_finite_with_gradients(kw):
  layer = _peer(**kw)
  x = _x()
  for train in (True, False):
    y, aux = _apply(layer, x, train)
    assert y.shape == (B, T, D) and bool(jnp.all(jnp.isfinite(y)))
  gp, gx = _grads(layer, x)
  assert _all_finite((gp, gx))
  # Every parameter group receives gradient (expert tables, queries, keys).
  assert float(jnp.abs(gp["u_ND"][...]).sum()) > 0 and float(jnp.abs(gp["v_ND"][...]).sum()) > 0
  assert float(jnp.abs(gp["retrieval"]["w_q_DQ"][...]).sum()) > 0
  assert float(jnp.abs(gp["retrieval"]["keys1"][...]).sum()) > 0
  if kw.get("glu"):
    assert float(jnp.abs(gp["g_ND"][...]).sum()) > 0


@pytest.mark.parametrize("per_head_keys", [True, False])
def test_peer_top1_fixed_key_is_h_neuron_mlp(per_head_keys):
  """Paper Eq. 8: with k = 1 and query-independent retrieval, PEER is an h-neuron MLP."""
  n = int(math.isqrt(N))
  layer = _peer(top_k=1, per_head_keys=per_head_keys, query_norm="batchnorm")
  # Query-independent queries: BN scale 0, bias 1 -> every query is all ones (eval mode).
  bn = layer.retrieval.query_bn
  bn.scale[...] = jnp.zeros_like(bn.scale[...])
  bn.bias[...] = jnp.ones_like(bn.bias[...])
  # Sub-keys: all -1 except one +1 row per table (per head): that key wins for any query.
  rows = [(1, 6), (5, 2)] if per_head_keys else [(3, 4)] * H
  c1 = -np.ones(layer.retrieval.keys1.shape, np.float32)
  c2 = -np.ones(layer.retrieval.keys2.shape, np.float32)
  for h, (a, b) in enumerate(rows):
    if per_head_keys:
      c1[h, a], c2[h, b] = 1.0, 1.0
    else:
      c1[a], c2[b] = 1.0, 1.0
  layer.retrieval.keys1[...] = jnp.asarray(c1)
  layer.retrieval.keys2[...] = jnp.asarray(c2)

  x = _x(1)
  y, aux = _apply(layer, x, False)
  chosen = [a * n + b for a, b in rows]
  np.testing.assert_array_equal(np.asarray(aux["expert_indices"])[..., 0],
                                np.broadcast_to(np.asarray(chosen), (B, T, H)))
  np.testing.assert_allclose(np.asarray(aux["expert_weights"]), 1.0)
  # The equivalent MLP: W_in = U[chosen], W_out = V[chosen].
  u, v = np.asarray(layer.u_ND[...]), np.asarray(layer.v_ND[...])
  x_np = np.asarray(x)
  want = _gelu_np(x_np @ u[chosen].T) @ v[chosen]
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def _peer_brute_force(layer, x, act=jax.nn.gelu):
  """Dense scores against all N = n² full keys, top-k, router, naive experts (no norm)."""
  r = layer.retrieval
  q = np.asarray(x) @ np.asarray(r.w_q_DQ[...])
  q = q.reshape(B, T, H, QD)
  c1, c2 = np.asarray(r.keys1[...]), np.asarray(r.keys2[...])
  n = c1.shape[-2]
  if c1.ndim == 2:
    c1, c2 = np.broadcast_to(c1, (H, *c1.shape)), np.broadcast_to(c2, (H, *c2.shape))
  # full_keys[h, i*n + j] = [c1[h, i]; c2[h, j]]
  full = np.concatenate([np.repeat(c1, n, axis=1), np.tile(c2, (1, n, 1))], axis=-1)
  scores = np.einsum("bthd,hnd->bthn", q, full)
  idx = np.argsort(-scores, axis=-1)[..., :K]
  top = np.take_along_axis(scores, idx, axis=-1)
  w = np.asarray(jax.nn.softmax(jnp.asarray(top), axis=-1) if r.router == "softmax"
                 else jax.nn.sigmoid(jnp.asarray(top)))
  u, v = np.asarray(layer.u_ND[...]), np.asarray(layer.v_ND[...])
  pre = np.einsum("btd,bthkd->bthk", np.asarray(x), u[idx])
  if layer.glu:
    g = np.asarray(layer.g_ND[...])
    hid = np.asarray(act(jnp.asarray(np.einsum("btd,bthkd->bthk", np.asarray(x), g[idx])))) * pre
  else:
    hid = np.asarray(act(jnp.asarray(pre)))
  y = np.einsum("bthk,bthkd->btd", w * hid, v[idx])
  return y, idx, w


@pytest.mark.parametrize("kw", [dict(), dict(per_head_keys=True), dict(router="sigmoid", glu=True)],
                         ids=["shared", "per_head", "sigmoid_glu"])
def test_peer_matches_brute_force(kw):
  layer = _peer(seed=3, query_norm="none", **kw)
  x = _x(4)
  y, aux = _apply(layer, x, True)
  y_bf, idx_bf, w_bf = _peer_brute_force(layer, x)
  np.testing.assert_array_equal(np.asarray(aux["expert_indices"]), idx_bf)
  np.testing.assert_allclose(np.asarray(aux["expert_weights"]), w_bf, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(y), y_bf, rtol=1e-4, atol=1e-5)


def test_peer_batchnorm_running_stats():
  layer = _peer(query_norm="batchnorm")
  bn = layer.retrieval.query_bn
  assert isinstance(bn.mean, nnx.BatchStat) and isinstance(bn.var, nnx.BatchStat)
  x = _x(5) * 3.0 + 1.0
  mean0, var0 = np.asarray(bn.mean[...]).copy(), np.asarray(bn.var[...]).copy()
  y_eval0, _ = _apply(layer, x, False)
  np.testing.assert_array_equal(np.asarray(bn.mean[...]), mean0)  # eval: no update
  y_train, _ = _apply(layer, x, True)
  mean1, var1 = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
  assert not np.allclose(mean1, mean0) and not np.allclose(var1, var0)
  # The update is an EMA (momentum 0.99) of the batch statistics of the queries.
  q = np.asarray(x).reshape(-1, D) @ np.asarray(layer.retrieval.w_q_DQ[...])
  np.testing.assert_allclose(mean1, 0.99 * mean0 + 0.01 * q.mean(0), rtol=1e-4, atol=1e-5)
  y_eval1, _ = _apply(layer, x, False)
  y_eval2, _ = _apply(layer, x, False)
  np.testing.assert_array_equal(np.asarray(y_eval1), np.asarray(y_eval2))  # deterministic
  np.testing.assert_array_equal(np.asarray(bn.mean[...]), mean1)
  assert not np.allclose(np.asarray(y_train), np.asarray(y_eval1))  # modes differ


def _rms(a):
  return float(jnp.sqrt(jnp.mean(jnp.square(a.astype(jnp.float32)))))


@pytest.mark.parametrize("kw", [
    dict(),
    pytest.param(dict(router="sigmoid"), marks=pytest.mark.slow),
    pytest.param(dict(glu=True), marks=pytest.mark.slow),
    pytest.param(dict(activation="relu", query_norm="rmsnorm"), marks=pytest.mark.slow),
], ids=["default", "sigmoid", "glu", "relu_rmsnorm"])
def test_peer_init_output_rms_matches_dense_ffw(kw):
  d = 64
  x = _x(6, (4, 64, d))
  act = kw.get("activation", "gelu")
  dense = DenseFFW(d, 4 * d, act, rngs=nnx.Rngs(1))
  peer = PEER(d, num_experts=32 ** 2, heads=4, top_k=8, query_dim=32, rngs=nnx.Rngs(2), **kw)
  ratio = _rms(_apply(peer, x, True)[0]) / _rms(_apply(dense, x, False)[0])
  assert 0.5 < ratio < 2.0, ratio


def test_peer_rejects_bad_config():
  with pytest.raises(ValueError, match="perfect square"):
    _peer(num_experts=60)
  with pytest.raises(ValueError, match="even"):
    _peer(query_dim=7)
  with pytest.raises(ValueError, match="top_k"):
    _peer(top_k=9)
  for bad in (dict(query_norm="bn"), dict(router="relu"), dict(activation="tanh")):
    with pytest.raises(ValueError):
      _peer(**bad)


# ----------------------------------------------------------------------- expert_stats


def test_expert_stats_hand_examples():
  n = 8
  uniform = jnp.ones((n,))
  assert float(es.expert_usage(uniform)) == 1.0
  assert abs(float(es.expert_unevenness(uniform))) < 1e-6
  single = jnp.zeros((n,)).at[3].set(2.5)
  assert float(es.expert_usage(single)) == 1.0 / n
  np.testing.assert_allclose(float(es.expert_unevenness(single)), math.log(n), rtol=1e-6)
  half = jnp.array([1.0, 1.0, 1.0, 1.0, 0, 0, 0, 0])  # uniform over half: KL = log 2
  np.testing.assert_allclose(float(es.expert_unevenness(half)), math.log(2), rtol=1e-6)
  assert float(es.expert_usage(half)) == 0.5
  assert float(es.expert_unevenness(jnp.zeros((n,)))) == pytest.approx(math.log(n))

  idx = jnp.array([[[0, 2]], [[2, 5]]], jnp.int32)  # (T=2, H=1, K=2)
  w = jnp.array([[[0.25, 0.75]], [[0.5, 0.5]]])
  z = es.accumulate_expert_weights(idx, w, n)
  assert z.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(z), [0.25, 0, 1.25, 0, 0, 0.5, 0, 0])
  stats = jax.jit(es.expert_stats, static_argnums=1)(
      {"expert_indices": idx, "expert_weights": w}, n)
  assert float(stats["usage"]) == 3 / 8
  p = np.array([0.25, 1.25, 0.5]) / 2.0
  np.testing.assert_allclose(float(stats["unevenness"]), math.log(n) + np.sum(p * np.log(p)),
                             rtol=1e-5)


# ------------------------------------------------------------------------------ MoE


def _moe_brute_force(layer, x):
  """Loops over sequences and experts: top-C tokens per expert, gated dense FFW."""
  x = np.asarray(x)
  b, t, d = x.shape
  E = layer.num_experts
  C = expert_capacity(t, E, layer.capacity_factor)
  wr, wi, wo = (np.asarray(p[...]) for p in (layer.w_router_DE, layer.w_in_EDF, layer.w_out_EFD))
  probs = np.asarray(jax.nn.softmax(jnp.asarray(x @ wr), axis=-1))
  y = np.zeros_like(x)
  count = np.zeros((b, t), np.int32)
  for bi in range(b):
    for e in range(E):
      toks = np.argsort(-probs[bi, :, e], kind="stable")[:C]
      for tok in toks:
        y[bi, tok] += probs[bi, tok, e] * (_gelu_np(x[bi, tok] @ wi[e]) @ wo[e])
        count[bi, tok] += 1
  return y, probs, count


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0])
def test_moe_matches_brute_force(capacity_factor):
  layer = MoE(D, num_experts=4, d_ff=12, capacity_factor=capacity_factor, rngs=nnx.Rngs(0))
  x = _x(7, (B, 12, D))
  y, aux = _apply(layer, x, False)
  y_bf, probs, count = _moe_brute_force(layer, x)
  assert y.shape == x.shape
  np.testing.assert_allclose(np.asarray(aux["router_probs"]), probs, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(aux["experts_per_token"]), count)
  assert float(aux["dropped_fraction"]) == pytest.approx(float(np.mean(count == 0)))
  np.testing.assert_allclose(np.asarray(y), y_bf, rtol=1e-4, atol=1e-5)


def test_moe_full_capacity_is_soft_mixture():
  """capacity_factor = E: every expert takes every token, y = Σ_e p_e · FFW_e(x)."""
  E = 4
  layer = MoE(D, num_experts=E, d_ff=12, capacity_factor=E, rngs=nnx.Rngs(1))
  x = _x(8)
  y, aux = _apply(layer, x, False)
  assert float(aux["dropped_fraction"]) == 0.0
  np.testing.assert_array_equal(np.asarray(aux["experts_per_token"]), E)
  wi, wo = layer.w_in_EDF[...], layer.w_out_EFD[...]
  ffw = jnp.einsum("ebtf,efd->ebtd", jax.nn.gelu(jnp.einsum("btd,edf->ebtf", x, wi)), wo)
  want = jnp.einsum("bte,ebtd->btd", aux["router_probs"], ffw)
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_moe_gradients_finite(activation):
  layer = MoE(D, num_experts=4, d_ff=12, activation=activation, rngs=nnx.Rngs(2))
  x = _x(9)
  y, aux = _apply(layer, x, True)
  assert y.shape == (B, T, D) and aux["router_probs"].shape == (B, T, 4)
  gp, gx = _grads(layer, x)
  assert _all_finite((gp, gx))
  assert float(jnp.abs(gp["w_router_DE"][...]).sum()) > 0
  assert layer.w_in_EDF.get_metadata()["out_sharding"] == ("experts", "embed", "mlp")


# ------------------------------------------------------------------------------ PKM


def _pkm(seed=0, **kw):
  cfg = dict(num_memories=N, heads=H, top_k=K, key_dim=QD, chunk_size=5)
  cfg.update(kw)
  return PKM(D, **cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("value_dim", [None, 6])
def test_pkm_shapes_and_gradients(value_dim):
  layer = _pkm(value_dim=value_dim)
  x = _x(10)
  y, aux = _apply(layer, x, True)
  assert y.shape == (B, T, D)
  assert aux["expert_indices"].shape == (B, T, H, K) and aux["expert_indices"].dtype == jnp.int32
  assert aux["expert_weights"].shape == (B, T, H, K)
  assert layer.retrieval.keys1.shape == (H, 8, QD // 2)  # per-head keys, as in Lample et al.
  gp, gx = _grads(layer, x)
  assert _all_finite((gp, gx))
  assert float(jnp.abs(gp["values_NV"][...]).sum()) > 0
  assert float(jnp.abs(gp["retrieval"]["w_q_DQ"][...]).sum()) > 0


def test_pkm_matches_brute_force():
  layer = _pkm(seed=4, query_norm="none")
  x = _x(11)
  y, aux = _apply(layer, x, True)
  r = layer.retrieval
  q = (np.asarray(x) @ np.asarray(r.w_q_DQ[...])).reshape(B, T, H, QD)
  c1, c2 = np.asarray(r.keys1[...]), np.asarray(r.keys2[...])
  n = c1.shape[1]
  full = np.concatenate([np.repeat(c1, n, axis=1), np.tile(c2, (1, n, 1))], axis=-1)
  scores = np.einsum("bthd,hnd->bthn", q, full)
  idx = np.argsort(-scores, axis=-1)[..., :K]
  w = np.asarray(jax.nn.softmax(jnp.asarray(np.take_along_axis(scores, idx, -1)), axis=-1))
  want = np.einsum("bthk,bthkd->btd", w, np.asarray(layer.values_NV[...])[idx])
  np.testing.assert_array_equal(np.asarray(aux["expert_indices"]), idx)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)


def test_embedding_bag_matches_reference_with_gradients():
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(10, 3)), jnp.float32)
  idx = jnp.asarray(rng.integers(0, 10, size=(7, 2, 3)), jnp.int32)  # duplicates included
  w = jnp.asarray(rng.normal(size=(7, 2, 3)), jnp.float32)
  dy = jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)
  f = lambda t, w: jnp.sum(dy * embedding_bag(t, idx, w, chunk_size=3))
  f_ref = lambda t, w: jnp.sum(dy * embedding_bag_reference(t, idx, w))
  np.testing.assert_allclose(f(table, w), f_ref(table, w), rtol=1e-5)
  for g, g_ref in zip(jax.grad(f, (0, 1))(table, w), jax.grad(f_ref, (0, 1))(table, w)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-6)


def test_pkm_init_output_rms_matches_dense_ffw():
  d = 64
  x = _x(12, (4, 64, d))
  dense = DenseFFW(d, 4 * d, "gelu", rngs=nnx.Rngs(1))
  pkm = PKM(d, num_memories=32 ** 2, heads=4, top_k=8, key_dim=32, rngs=nnx.Rngs(2))
  ratio = _rms(_apply(pkm, x, True)[0]) / _rms(_apply(dense, x, False)[0])
  assert 0.5 < ratio < 2.0, ratio
