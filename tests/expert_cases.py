"""Shared inputs and tolerance checks for the expert-kernel tests (Pallas TPU and GPU)."""

import numpy as np

import jax.numpy as jnp


def expert_inputs(seed, t, d, h, k, n, table_dtype=jnp.float32, dup=True):
  """x (t, d), idx (t, h, k) int32, w (t, h, k), u and v (n, d) in `table_dtype`.

  With `dup`: duplicates within a token (two slots of head 0 pick the same expert, the last
  head repeats head 0's first) and across tokens (expert 3 chosen by every token, a
  segment longer than one chunk of sorted pairs).
  """
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  idx = rng.integers(0, n, size=(t, h, k))
  if dup:
    idx[:, 0, 1] = idx[:, 0, 0]
    idx[:, -1, 0] = idx[:, 0, 0]
    idx[:, 0, -1] = 3
  w = jnp.asarray(rng.normal(size=(t, h, k)), jnp.float32)
  u = jnp.asarray(rng.normal(size=(n, d)) / np.sqrt(d), table_dtype)
  v = jnp.asarray(rng.normal(size=(n, d)), table_dtype)
  return x, jnp.asarray(idx, jnp.int32), w, u, v


def assert_close(got, want, rtol=1e-4, atol=1e-4):
  """allclose with `atol` relative to max |want| (at least 1)."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * max(1.0, np.abs(want).max()))


def check_values_and_gradients(kernel, case_inputs, table_dtype, activation):
  """`kernel(x, idx, w, u, v, activation)` against `peer_experts_reference`: output and
  gradients in x, w, u, v (bf16 table gradients in bf16, rtol/atol 1e-2), and exactly zero
  gradient in the table rows no token chose."""
  import jax
  from peer_jax.ops import peer_experts_reference

  x, idx, w, u, v = case_inputs
  u32, v32 = u.astype(jnp.float32), v.astype(jnp.float32)
  ct = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)

  def loss(fn):
    return lambda x, w, u, v: jnp.sum(ct * fn(x, idx, w, u, v, activation).astype(jnp.float32))

  y, grads = jax.jit(jax.value_and_grad(loss(kernel), argnums=(0, 1, 2, 3)))(x, w, u, v)
  y_ref, grads_ref = jax.value_and_grad(loss(peer_experts_reference), argnums=(0, 1, 2, 3))(
      x, w, u32, v32)
  assert_close(y, y_ref)
  for name, g, g_ref in zip("x w u v".split(), grads, grads_ref):
    assert g.shape == g_ref.shape, name
    if name in "uv":
      assert g.dtype == table_dtype, name
      if table_dtype == jnp.bfloat16:
        assert_close(g, g_ref, rtol=1e-2, atol=1e-2)
        continue
    assert_close(g, g_ref)
  untouched = np.setdiff1d(np.arange(u.shape[0]), np.asarray(idx).ravel())
  assert not np.any(np.asarray(grads[2], np.float32)[untouched])
  assert not np.any(np.asarray(grads[3], np.float32)[untouched])
