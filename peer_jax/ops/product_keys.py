"""Product-key top-k retrieval (Lample et al. 2019), as used by PEER.

A product key is the concatenation [c1[i]; c2[j]] of two sub-keys, so the score of
key (i, j) for a query [q1; q2] is q1·c1[i] + q2·c2[j]. The best k keys among all n²
must pair a top-k row of the first half with a top-k row of the second half, so the
exact top-k is found from k² candidates at O((n + k²)·d) instead of O(n²·d).

Keys come in two layouts:
* shared keys, c1/c2 of shape (n, d/2): queries (..., d/2);
* per-head keys, c1/c2 of shape (H, n, d/2): queries (..., H, d/2), head h of the
  query uses keys c[h].

Gradients flow to q1, q2, c1, c2 through the returned scores; the indices are integers.
The backward is sparse: only the k selected sub-keys of each half receive gradient, so
instead of differentiating `lax.top_k` (a scatter into dense (..., n) score gradients
followed by two (..., n) x (n, d/2) matmuls) `_selected_scores` re-gathers the k selected
sub-key rows: dq = Σ_k ds_k · c[i_k] and dc[i_k] += ds_k · q (scatter-add of k rows per
query). Same values and gradients as autodiff of the dense form, at O(k·d) instead of
O(n·d) per query.

Two forms, chosen per platform (`short_gathers`). On CPU and GPU: the sparse backward
above (gathers and scatter-adds of k rows per query), and `take_along_axis` to pick the k
of k² candidates. On TPU, where every gathered or scattered short row costs a whole
(8, 128) layout tile, neither: the k cotangents are spread into a (..., n) array by
comparisons and dq, dc are two matmuls against it (XLA's cost model charged the sparse
form ~5x as many bytes; the extra FLOPs, 4·n·d/2 per query half, are ~1 % of the layer's),
and the candidates are picked by one-hot selects (a `take_along_axis` along a short last
axis cost ~100x a select in XLA's estimate; docs/scaling.md). On CPU the TPU form makes
the retrieval's fwd+bwd ~3x slower (2048 tokens, 8 heads, n = 1024), hence the switch.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from peer_jax.ops import fast_topk
from peer_jax.ops.chunking import map_chunks


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


def _gather_keys(c, idx):
  """Selected sub-key rows: (n, d) or (H, n, d) keys, idx (..., [H,] k) -> (..., [H,] k, d)."""
  if c.ndim == 2:
    return c.at[idx].get(mode="promise_in_bounds")
  heads, n, d = c.shape
  flat = idx + (jnp.arange(heads, dtype=idx.dtype) * n)[:, None]  # row h*n + i of (H*n, d)
  return c.reshape(heads * n, d).at[flat].get(mode="promise_in_bounds")


ROUTING_NAME = "expert_routing"  # checkpoint name of the retrieval's small outputs


def select_last(v, j, gather: bool = False):
  """v[..., j[..., m]] along the last axis, as one-hot selects (exact: one term per sum).

  Same values (and, for floats, gradients) as `jnp.take_along_axis(v, j, axis=-1)`, but
  without a gather: v (..., W), j (..., M) -> (..., M), for small W (here k or k²).
  gather=True: `take_along_axis` itself (cheaper on CPU)."""
  if gather:
    return jnp.take_along_axis(v, j, axis=-1)
  iota = lax.broadcasted_iota(j.dtype, (1,) * j.ndim + (v.shape[-1],), j.ndim)
  hit = j[..., :, None] == iota  # (..., M, W)
  return jnp.sum(jnp.where(hit, v[..., None, :], jnp.zeros((), v.dtype)), axis=-1)


def use_short_gathers() -> bool:
  """Whether the platform being built for gathers short rows cheaply: all but TPU."""
  from peer_jax.ops.kernels import backend_platform
  return backend_platform() != "tpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _selected_scores(s_sel, q, c, idx, sparse):
  """Returns `s_sel` (the top-k scores q·c[idx], computed densely in the forward) with a
  hand-written VJP for q and c through the k selected sub-keys; `s_sel` itself gets no
  cotangent (it comes from a stop-gradient'ed dense score matrix). sparse: gather the k
  rows and scatter-add into dc; else the dense (..., n) form (module docstring)."""
  del q, c, idx, sparse
  return s_sel


def _selected_scores_fwd(s_sel, q, c, idx, sparse):
  del sparse
  return s_sel, (q, c, idx)


def _dense_backward(q, c, idx, ds, acc):
  """dq, dc via ds spread over all n sub-keys: ds_n[..., i] = Σ_k ds_k [idx_k == i]."""
  n = c.shape[-2]
  iota = lax.broadcasted_iota(idx.dtype, (1,) * idx.ndim + (n,), idx.ndim)
  ds_n = jnp.sum(jnp.where(idx[..., None] == iota, ds[..., None], jnp.zeros((), acc)),
                 axis=-2)  # (..., [H,] n)
  cdt = jnp.promote_types(c.dtype, q.dtype)
  ds_n = ds_n.astype(cdt)
  if c.ndim == 2:
    dq = jnp.einsum("...n,nd->...d", ds_n, c.astype(cdt), preferred_element_type=acc)
    dc = jnp.einsum("...n,...d->nd", ds_n, q.astype(cdt), preferred_element_type=acc)
  else:
    dq = jnp.einsum("...hn,hnd->...hd", ds_n, c.astype(cdt), preferred_element_type=acc)
    dc = jnp.einsum("...hn,...hd->hnd", ds_n, q.astype(cdt), preferred_element_type=acc)
  return dq, dc


def _sparse_backward(q, c, idx, ds, acc):
  """dq, dc through the k selected sub-key rows: gather them, scatter-add into dc."""
  rows = _gather_keys(c, idx).astype(acc)  # (..., [H,] k, d)
  dq = jnp.einsum("...k,...kd->...d", ds, rows)
  d = c.shape[-1]
  per_row = (ds[..., None] * q.astype(acc)[..., None, :])  # (..., [H,] k, d)
  if c.ndim == 2:
    dc = jnp.zeros(c.shape, acc).at[idx.reshape(-1)].add(
        per_row.reshape(-1, d), mode="promise_in_bounds")
  else:
    heads, n, _ = c.shape
    flat = idx + (jnp.arange(heads, dtype=idx.dtype) * n)[:, None]
    dc = jnp.zeros((heads * n, d), acc).at[flat.reshape(-1)].add(
        per_row.reshape(-1, d), mode="promise_in_bounds").reshape(c.shape)
  return dq, dc


def _selected_scores_bwd(sparse, res, ds):
  q, c, idx = res
  acc = jnp.result_type(jnp.float32, q.dtype, c.dtype)
  backward = _sparse_backward if sparse else _dense_backward
  dq, dc = backward(q, c, idx, ds.astype(acc), acc)
  return None, dq.astype(q.dtype), dc.astype(c.dtype), None


_selected_scores.defvjp(_selected_scores_fwd, _selected_scores_bwd)


def _check(c1, c2, k):
  if c1.shape != c2.shape:
    raise ValueError(f"sub-key sets differ in shape: {c1.shape} vs {c2.shape}")
  n = c1.shape[-2]
  if not 1 <= k <= n:
    raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
  return n


def _topk_block(q1, q2, c1, c2, k, n, top_k, sparse):
  sg = lax.stop_gradient
  s1, i1 = top_k(_half_scores(sg(q1), sg(c1)), k)  # (..., k) each
  s2, i2 = top_k(_half_scores(sg(q2), sg(c2)), k)
  # Under remat (model.remat) these small arrays are kept, so the backward pass does not
  # recompute the dense scores and their sorts (peer_jax.model.remat_policy).
  s1, i1, s2, i2 = (checkpoint_name(a, ROUTING_NAME) for a in (s1, i1, s2, i2))
  # Same values; gradients only through the k selected sub-keys of each half.
  s1 = _selected_scores(s1, q1, c1, i1, sparse)
  s2 = _selected_scores(s2, q2, c2, i2, sparse)
  cand = s1[..., :, None] + s2[..., None, :]  # (..., k, k): row a pairs with column b
  cand = cand.reshape(*cand.shape[:-2], k * k)
  _, flat = top_k(sg(cand), k)
  flat = checkpoint_name(flat, ROUTING_NAME)
  scores = select_last(cand, flat, sparse)
  rows = select_last(i1, flat // k, sparse)
  cols = select_last(i2, flat % k, sparse)
  return scores, (rows * n + cols).astype(jnp.int32)


def product_key_topk(q1, q2, c1, c2, k, *, fast_cpu_topk=False, chunk_size=None,
                     short_gathers=None):
  """Exact top-k over the n² product keys.

  Args:
    q1, q2: (..., d/2) query halves ((..., H, d/2) with per-head keys).
    c1, c2: (n, d/2) sub-key sets, or (H, n, d/2) for per-head keys.
    k: number of keys to return, 1 <= k <= n (static).
    fast_cpu_topk: on CPU, select with the multi-threaded FFI kernel
      (`peer_jax.ops.fast_topk`; same results as `lax.top_k`). Only for programs that
      are not partitioned over several devices (the custom call has no sharding rule).
    chunk_size: if set, the queries (flattened over the leading axes, the per-head axis
      kept) go through in chunks of this many rows (`lax.map`), so the dense
      (rows, n) sub-key scores, the largest temporaries, exist for one chunk at a time
      and peak memory does not grow with the number of tokens. Same results. Meant for
      single-device programs: a sharded token axis would be regathered by the reshape.
    short_gathers: True gathers short rows (`take_along_axis` for the candidates; the
      backward gathers and scatter-adds the k selected sub-key rows); False does neither
      (one-hot selects; the backward spreads the cotangents over the n sub-keys and uses
      two matmuls). Same values and gradients. None picks per platform
      (`use_short_gathers`: False on TPU).

  Returns:
    scores: (..., k) in descending order.
    indices: (..., k) int32, key (i, j) numbered i * n + j.
  """
  n = _check(c1, c2, k)
  top_k = fast_topk.top_k if fast_cpu_topk else lax.top_k
  sparse = use_short_gathers() if short_gathers is None else bool(short_gathers)
  kept = 2 if c1.ndim == 3 else 1  # trailing query axes of one row: ([H,] d/2)
  lead = q1.shape[:-kept]
  num_rows = math.prod(lead)
  if chunk_size is None or num_rows <= chunk_size:
    return _topk_block(q1, q2, c1, c2, k, n, top_k, sparse)
  rows = lambda q: q.reshape(num_rows, *q.shape[-kept:])
  # Padded zero rows of the last chunk are sliced away (no gradient).
  scores, idx = map_chunks(lambda qs: _topk_block(qs[0], qs[1], c1, c2, k, n, top_k, sparse),
                           (rows(q1), rows(q2)), int(chunk_size))
  out_shape = lead + scores.shape[1:]
  return scores.reshape(out_shape), idx.reshape(out_shape)


def product_key_topk_reference(q1, q2, c1, c2, k):
  """Brute force: materialise all n² scores, then top-k. For tests only."""
  n = _check(c1, c2, k)
  s1 = _half_scores(q1, c1)
  s2 = _half_scores(q2, c2)
  full = (s1[..., :, None] + s2[..., None, :]).reshape(*s1.shape[:-1], n * n)
  scores, idx = lax.top_k(full, k)
  return scores, idx.astype(jnp.int32)
