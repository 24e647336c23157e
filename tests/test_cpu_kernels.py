"""The FFI CPU kernels against their references.

* top-k (fast_topk.py, cpu_topk.cc) against lax.top_k: identical values and indices (ties,
  NaNs, signed zeros included), and the product-key retrieval built on it: identical
  outputs and gradients.
* the fused expert path (cpu_experts.py, cpu_experts.cc) against the naive gather-einsum
  references and the chunked XLA path: values and gradients (summation order differs).
* the build: a failed build falls back to XLA with a warning; the kernels can be
  switched off."""

import logging

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import lax

from peer_jax.ops import (cpu_kernels, fast_topk, peer_experts, peer_experts_glu,
                          peer_experts_glu_reference, peer_experts_reference, product_key_topk)
from peer_jax.ops import cpu_experts


@pytest.fixture(scope="module", autouse=True)
def kernel():
  if not cpu_kernels.available():
    pytest.fail("the CPU top-k kernel did not build (see the warning above); CI has a C++ "
                "compiler, so this is a bug")


def _assert_same(x, k):
  got_v, got_i = jax.jit(lambda a: fast_topk.top_k(a, k))(x)
  want_v, want_i = lax.top_k(x, k)
  assert got_i.dtype == jnp.int32 and got_v.shape == want_v.shape
  np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
  np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))


@pytest.mark.parametrize("shape,k", [
    ((64, 1024), 16),   # the PEER sub-key case
    ((37, 256), 16),    # the k·k candidate case, odd row count
    ((3, 5, 100), 7),   # several batch axes, n not a multiple of the group count
    ((10, 16), 16),     # k = n
    ((10, 33), 1),
    ((4, 2, 3), 2),
    ((50000, 8), 3),    # many short rows: several thread-pool blocks
])
def test_matches_lax_top_k_on_random_rows(shape, k):
  x = jax.random.normal(jax.random.key(sum(shape) + k), shape)
  _assert_same(x, k)


@pytest.mark.parametrize("k", [1, 5, 16, 40])
def test_ties_go_to_the_lower_index(k):
  # Few distinct values: most of the top-k are ties, across the strided groups.
  x = jax.random.randint(jax.random.key(k), (32, 300), 0, 4).astype(jnp.float32)
  _assert_same(x, k)


def test_special_values_follow_lax_order():
  row = jnp.array([1., 1., 0., -0., jnp.nan, jnp.inf, -jnp.inf, 1., 2., -jnp.nan, 0.,
                   -1e-38, 1e-45, -1e-45])
  for k in range(1, row.shape[0] + 1):
    _assert_same(row[None], k)


def test_vmap_and_non_f32_fall_back_or_batch():
  x = jax.random.normal(jax.random.key(0), (3, 4, 64))
  got = jax.vmap(lambda a: fast_topk.top_k(a, 5))(x)
  want = lax.top_k(x, 5)
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
  xb = x.astype(jnp.bfloat16)  # not f32: lax.top_k itself
  np.testing.assert_array_equal(np.asarray(fast_topk.top_k(xb, 5)[1]),
                                np.asarray(lax.top_k(xb, 5)[1]))


def test_product_key_topk_values_and_gradients_match_the_xla_path():
  rng = jax.random.split(jax.random.key(1), 4)
  q1 = jax.random.normal(rng[0], (2, 24, 4, 16))
  q2 = jax.random.normal(rng[1], (2, 24, 4, 16))
  c1 = jax.random.normal(rng[2], (128, 16))
  c2 = jax.random.normal(rng[3], (128, 16))

  def loss(fast, q1, q2, c1, c2):
    s, i = product_key_topk(q1, q2, c1, c2, 8, fast_cpu_topk=fast)
    return jnp.sum(jnp.sin(s) * (i % 7)), (s, i)

  grad = lambda fast: jax.jit(jax.value_and_grad(
      lambda *a: loss(fast, *a), argnums=(0, 1, 2, 3), has_aux=True))(q1, q2, c1, c2)
  (lf, (sf, i_f)), gf = grad(True)
  (lx, (sx, ix)), gx = grad(False)
  np.testing.assert_array_equal(np.asarray(i_f), np.asarray(ix))
  np.testing.assert_array_equal(np.asarray(sf), np.asarray(sx))
  for a, b in zip(gf, gx):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The custom call is really in the fast program (and not in the other).
  hlo = lambda fast: jax.jit(lambda *a: loss(fast, *a)[0]).lower(q1, q2, c1, c2).as_text()
  assert fast_topk._TARGET in hlo(True) and fast_topk._TARGET not in hlo(False)


def test_failed_build_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
  monkeypatch.setattr(cpu_kernels, "_registered", False)
  monkeypatch.setenv("PEER_JAX_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  cpu_kernels.available.cache_clear()
  try:
    with caplog.at_level(logging.WARNING):
      assert not cpu_kernels.available()
    assert "using the XLA paths" in caplog.text
    x = jax.random.normal(jax.random.key(0), (4, 50))
    np.testing.assert_array_equal(np.asarray(fast_topk.top_k(x, 3)[1]),
                                  np.asarray(lax.top_k(x, 3)[1]))
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind
  finally:
    monkeypatch.undo()
    cpu_kernels.available.cache_clear()
    assert cpu_kernels.available()


def test_can_be_switched_off(monkeypatch):
  monkeypatch.setenv("PEER_JAX_CPU_KERNELS", "0")
  cpu_kernels.available.cache_clear()
  try:
    x = jnp.ones((2, 8))
    assert fast_topk._TARGET not in jax.jit(lambda a: fast_topk.top_k(a, 2)).lower(x).as_text()
  finally:
    monkeypatch.undo()
    cpu_kernels.available.cache_clear()


# ------------------------------------------------------------------ fused expert path


def _expert_inputs(seed, T=37, H=2, K=4, D=24, N=50):
  rng = np.random.default_rng(seed)
  f = lambda *shape, s=1.0: jnp.asarray(rng.normal(size=shape) * s, jnp.float32)
  idx = jnp.asarray(rng.integers(0, N, (T, H, K)), jnp.int32)
  idx = idx.at[0, 1].set(idx[0, 0]).at[5].set(idx[3])  # duplicates within / across tokens
  return f(T, D), idx, f(T, H, K), f(N, D, s=0.3), f(N, D, s=0.3), f(N, D), f(T, D)


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("activation", [jax.nn.gelu, jax.nn.relu])
def test_fused_experts_match_reference_values_and_gradients(glu, activation):
  x, idx, w, u, g, v, probe = _expert_inputs(0)
  if glu:
    fast = lambda x, w, u, g, v: peer_experts_glu(x, idx, w, u, g, v, activation, fast_cpu=True)
    ref = lambda x, w, u, g, v: peer_experts_glu_reference(x, idx, w, u, g, v, activation)
    args = (x, w, u, g, v)
  else:
    fast = lambda x, w, u, v: peer_experts(x, idx, w, u, v, activation, fast_cpu=True)
    ref = lambda x, w, u, v: peer_experts_reference(x, idx, w, u, v, activation)
    args = (x, w, u, v)
  assert "peer_jax_gather_dot_f32" in jax.jit(fast).lower(*args).as_text()
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * probe)
  argnums = tuple(range(len(args)))
  got_y, got_g = jax.jit(jax.value_and_grad(loss(fast), argnums))(*args)
  want_y, want_g = jax.value_and_grad(loss(ref), argnums)(*args)
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-4)
  for a, b in zip(got_g, want_g):
    assert float(jnp.abs(b).max()) > 0
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_fused_experts_untouched_rows_get_exact_zero_gradient():
  x, idx, w, u, _, v, probe = _expert_inputs(1, N=400)
  du, dv = jax.grad(lambda u, v: jnp.sum(peer_experts(x, idx, w, u, v, fast_cpu=True) * probe),
                    (0, 1))(u, v)
  untouched = np.setdiff1d(np.arange(400), np.asarray(idx).ravel())
  assert untouched.size > 0
  assert not np.asarray(du)[untouched].any() and not np.asarray(dv)[untouched].any()


def test_scatter_outer_sums_duplicates_over_many_row_blocks():
  # Rows far apart (several 256 KiB blocks at D = 256) and repeated ids.
  rng = np.random.default_rng(2)
  N, D, T, M = 3000, 256, 50, 6
  idx = jnp.asarray(rng.integers(0, N, (T, M)), jnp.int32).at[:, 0].set(N - 1)
  a = jnp.asarray(rng.normal(size=(T, M)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
  got = jax.jit(cpu_experts.scatter_outer, static_argnums=0)(N, idx, a, x)
  want = jnp.zeros((N, D)).at[idx.ravel()].add((a[:, :, None] * x[:, None, :]).reshape(-1, D))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fused_experts_fall_back_for_bf16_tables():
  x, idx, w, u, _, v, _ = _expert_inputs(3)
  f = jax.jit(lambda x, w, u, v: peer_experts(x, idx, w, u, v, fast_cpu=True))
  hlo = f.lower(x, w, u.astype(jnp.bfloat16), v.astype(jnp.bfloat16)).as_text()
  assert "peer_jax_gather_dot_f32" not in hlo


def test_peer_and_pkm_layers_use_the_kernels_on_one_device():
  from flax import nnx
  from peer_jax.layers.peer import PEER
  from peer_jax.layers.pkm import PKM
  x = jnp.ones((2, 8, 32))
  peer = PEER(32, num_experts=64, heads=2, top_k=4, query_dim=16, query_norm="none",
              rngs=nnx.Rngs(0))
  hlo = jax.jit(lambda x: peer(x)[0]).lower(x).as_text()
  assert "peer_jax_topk_f32" in hlo and "peer_jax_gather_dot_f32" in hlo
  pkm = PKM(32, num_memories=64, heads=2, top_k=4, key_dim=16, query_norm="none",
            rngs=nnx.Rngs(0))
  assert "peer_jax_topk_f32" in jax.jit(lambda x: pkm(x)[0]).lower(x).as_text()
