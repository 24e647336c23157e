"""Product-key top-k retrieval (Lample et al. 2019), as used by PEER.

A product key is the concatenation [c1[i]; c2[j]] of two sub-keys, so the score of
key (i, j) for a query [q1; q2] is q1·c1[i] + q2·c2[j]. The best k keys among all n²
must pair a top-k row of the first half with a top-k row of the second half, so the
exact top-k is found from k² candidates at O((n + k²)·d) instead of O(n²·d).

Keys come in two layouts:
* shared keys, c1/c2 of shape (n, d/2): queries (..., d/2);
* per-head keys, c1/c2 of shape (H, n, d/2): queries (..., H, d/2), head h of the
  query uses keys c[h].

Gradients flow to q1, q2, c1, c2 through the returned scores (`lax.top_k` is
differentiable in its values); the indices are integers.
"""

import jax.numpy as jnp
from jax import lax


def _half_scores(q, c):
  """Scores of one query half against its sub-keys: (..., n)."""
  if c.ndim == 2:
    return jnp.einsum("...d,nd->...n", q, c)
  if c.ndim == 3:
    if q.ndim < 2 or q.shape[-2] != c.shape[0]:
      raise ValueError(
          f"per-head keys {c.shape} need queries (..., {c.shape[0]}, d/2), got {q.shape}")
    return jnp.einsum("...hd,hnd->...hn", q, c)
  raise ValueError(f"sub-keys must be (n, d/2) or (H, n, d/2), got {c.shape}")


def _check(c1, c2, k):
  if c1.shape != c2.shape:
    raise ValueError(f"sub-key sets differ in shape: {c1.shape} vs {c2.shape}")
  n = c1.shape[-2]
  if not 1 <= k <= n:
    raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
  return n


def product_key_topk(q1, q2, c1, c2, k):
  """Exact top-k over the n² product keys.

  Args:
    q1, q2: (..., d/2) query halves ((..., H, d/2) with per-head keys).
    c1, c2: (n, d/2) sub-key sets, or (H, n, d/2) for per-head keys.
    k: number of keys to return, 1 <= k <= n (static).

  Returns:
    scores: (..., k) in descending order.
    indices: (..., k) int32, key (i, j) numbered i * n + j.
  """
  n = _check(c1, c2, k)
  s1, i1 = lax.top_k(_half_scores(q1, c1), k)  # (..., k) each
  s2, i2 = lax.top_k(_half_scores(q2, c2), k)
  cand = s1[..., :, None] + s2[..., None, :]  # (..., k, k): row a pairs with column b
  scores, flat = lax.top_k(cand.reshape(*cand.shape[:-2], k * k), k)
  rows = jnp.take_along_axis(i1, flat // k, axis=-1)
  cols = jnp.take_along_axis(i2, flat % k, axis=-1)
  return scores, (rows * n + cols).astype(jnp.int32)


def product_key_topk_reference(q1, q2, c1, c2, k):
  """Brute force: materialise all n² scores, then top-k. For tests only."""
  n = _check(c1, c2, k)
  s1 = _half_scores(q1, c1)
  s2 = _half_scores(q2, c2)
  full = (s1[..., :, None] + s2[..., None, :]).reshape(*s1.shape[:-1], n * n)
  scores, idx = lax.top_k(full, k)
  return scores, idx.astype(jnp.int32)
