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
