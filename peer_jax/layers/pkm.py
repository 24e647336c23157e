"""PKM: product-key memory (Lample et al. 2019), the paper's second baseline.

    y_BTD, aux = PKM(...)(x_BTD, train=bool)

Same retrieval as PEER (`ProductKeyRetrieval`: query network, query norm, product keys,
softmax router) but with per-head sub-keys as in Lample et al., and the retrieved items
are value vectors, not neurons: y = Σ_heads Σ_k w · values[idx] (an EmbeddingBag with
per-sample weights), optionally followed by a value_dim -> D projection.

The weighted gather-sum (`embedding_bag`) is chunked over tokens with a hand-written
VJP, like `peer_experts`: the forward never holds more than (chunk, heads·top_k, V)
gathered rows, and the backward scatter-adds the value-table gradient into one dense
accumulator carried through a scan (no per-chunk (N, V) temporaries).

Init: values std √(top_k / (2·heads)). With near-uniform softmax weights (Σ_k w² ≈ 1/k
per head, see peer.py) the output variance per feature is ≈ heads·(1/k)·k/(2·heads)
= 0.5, comparable to a dense 4D FFW (a² = 0.425 GELU, 0.5 ReLU); `value_init`
then applies the block's depth scale like PEER's (see `peer.table_init_std`).
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from peer_jax.layers.common import fan_in_normal, param
from peer_jax.layers.peer import ProductKeyRetrieval, table_init_std


def _chunks(a, chunk_size):
  pad = -a.shape[0] % chunk_size
  if pad:
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
  return a.reshape(-1, chunk_size, *a.shape[1:])


def _unchunk(a, num_tokens):
  return a.reshape(-1, *a.shape[2:])[:num_tokens]


def _acc(*arrays):
  return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def _bag_forward(chunk_size, table_NV, idx_TM, w_TM):
  acc = _acc(table_NV, w_TM)

  def body(c):
    idx_CM, w_CM = c
    rows_CMV = jnp.take(table_NV, idx_CM, axis=0)
    return jnp.einsum("cm,cmv->cv", w_CM.astype(acc), rows_CMV, preferred_element_type=acc)

  y = lax.map(body, (_chunks(idx_TM, chunk_size), _chunks(w_TM, chunk_size)))
  return _unchunk(y, idx_TM.shape[0]).astype(jnp.result_type(table_NV, w_TM))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bag(chunk_size, table_NV, idx_TM, w_TM):
  return _bag_forward(chunk_size, table_NV, idx_TM, w_TM)


def _bag_fwd(chunk_size, table_NV, idx_TM, w_TM):
  return _bag_forward(chunk_size, table_NV, idx_TM, w_TM), (table_NV, idx_TM, w_TM)


def _bag_bwd(chunk_size, res, dy_TV):
  table_NV, idx_TM, w_TM = res
  acc = _acc(table_NV, w_TM)

  def body(dtable_NV, c):
    idx_CM, w_CM, dy_CV = c
    dy_CV = dy_CV.astype(acc)
    rows_CMV = jnp.take(table_NV, idx_CM, axis=0)
    dw_CM = jnp.einsum("cv,cmv->cm", dy_CV, rows_CMV, preferred_element_type=acc)
    upd = (w_CM.astype(acc)[:, :, None] * dy_CV[:, None, :]).reshape(-1, dy_CV.shape[-1])
    return dtable_NV.at[idx_CM.reshape(-1)].add(upd), dw_CM

  chunks = tuple(_chunks(a, chunk_size) for a in (idx_TM, w_TM, dy_TV))
  dtable_NV, dw = lax.scan(body, jnp.zeros(table_NV.shape, acc), chunks)
  dw_TM = _unchunk(dw, idx_TM.shape[0]).astype(w_TM.dtype)
  # Integer indices get a float0 cotangent.
  didx = jnp.zeros(idx_TM.shape, jax.dtypes.float0)
  return dtable_NV.astype(table_NV.dtype), didx, dw_TM


_bag.defvjp(_bag_fwd, _bag_bwd)


def embedding_bag(table_NV, indices, weights, *, chunk_size: int = 512):
  """y[t] = Σ_m weights[t, m] · table[indices[t, m]], chunked over tokens.

  indices/weights: (T, ...) (trailing dims flattened); returns (T, V). Differentiable in
  table and weights.
  """
  num_tokens = indices.shape[0]
  idx_TM = indices.reshape(num_tokens, -1).astype(jnp.int32)
  w_TM = weights.reshape(num_tokens, -1)
  chunk_size = max(1, min(int(chunk_size), num_tokens))
  return _bag(chunk_size, table_NV, idx_TM, w_TM)


def embedding_bag_reference(table_NV, indices, weights):
  """Naive gather + weighted sum. For tests only."""
  t = indices.shape[0]
  return jnp.einsum("tm,tmv->tv", weights.reshape(t, -1), table_NV[indices.reshape(t, -1)])


class PKM(nnx.Module):
  """Product-key memory layer: heads × top_k softmax-weighted values out of num_memories.

  Parameters: the retrieval's w_q_DQ, query norm and per-head sub-keys
  (heads, n, key_dim/2); values_NV (num_memories, value_dim) with logical names
  ('experts', 'expert_embed'); with value_dim != d_model an output projection
  w_out_VD (value_dim, d_model).
  """

  def __init__(self, d_model: int, *, num_memories: int, heads: int, top_k: int, key_dim: int,
               query_norm: str = "batchnorm", value_dim: int | None = None,
               chunk_size: int = 512, value_init: str = "match_dense", out_scale: float = 1.0,
               rngs: nnx.Rngs, dtype=jnp.float32):
    value_dim = value_dim or d_model
    self.retrieval = ProductKeyRetrieval(
        d_model, num_keys=num_memories, heads=heads, top_k=top_k, key_dim=key_dim,
        query_norm=query_norm, per_head_keys=True, router="softmax",
        chunk_tokens=chunk_size, rngs=rngs, dtype=dtype)
    self.chunk_size, self.dtype = chunk_size, dtype
    values_std = table_init_std(value_init, math.sqrt(top_k / (2 * heads)), d_model, out_scale)
    self.values_NV = param(rngs, nnx.initializers.normal(stddev=values_std),
                           (num_memories, value_dim), ("experts", "expert_embed"))
    self.project = value_dim != d_model
    if self.project:
      self.w_out_VD = param(rngs, fan_in_normal(value_dim), (value_dim, d_model),
                            ("expert_embed", "embed"))

  def __call__(self, x_BTD, *, train: bool = False, segment_ids_BT=None, decode: bool = False):
    del segment_ids_BT, decode
    B, T, _ = x_BTD.shape
    _, idx_BTHK, w_BTHK = self.retrieval(x_BTD.astype(self.dtype), train=train)
    y_TV = embedding_bag(self.values_NV[...], idx_BTHK.reshape(B * T, -1),
                         w_BTHK.reshape(B * T, -1), chunk_size=self.chunk_size)
    y_BTV = y_TV.reshape(B, T, -1).astype(self.dtype)
    if self.project:
      y_BTV = y_BTV @ self.w_out_VD[...].astype(self.dtype)
    aux = {"expert_indices": idx_BTHK, "expert_weights": w_BTHK}
    return y_BTV, aux
