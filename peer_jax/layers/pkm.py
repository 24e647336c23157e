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

Kernel switch `model.pkm.kernel` (`resolve_bag_kernel`): the bag is PEER's weighted-sum
half, so the fused CPU FFI kernels apply as they are (gather_wsum forward, gather_dot and
scatter_outer backward): `cpu_ffi`, and `auto` on one CPU device with an f32 table. There
is no Pallas embedding-bag kernel yet: `pallas` is an error, and `auto` on TPU / GPU takes
the XLA bag (logged once).

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


@jax.custom_vjp
def _bag_cpu(table_NV, idx_TM, w_TM):
  from peer_jax.ops.cpu_experts import gather_wsum
  return gather_wsum(table_NV, idx_TM, w_TM)


def _bag_cpu_fwd(table_NV, idx_TM, w_TM):
  return _bag_cpu(table_NV, idx_TM, w_TM), (table_NV, idx_TM, w_TM)


def _bag_cpu_bwd(res, dy_TV):
  from peer_jax.ops.cpu_experts import gather_dot, scatter_outer
  table_NV, idx_TM, w_TM = res
  dy_TV = dy_TV.astype(jnp.float32)
  dw_TM = gather_dot(table_NV, idx_TM, dy_TV)
  dtable_NV = scatter_outer(table_NV.shape[0], idx_TM, w_TM, dy_TV)
  return dtable_NV, jnp.zeros(idx_TM.shape, jax.dtypes.float0), dw_TM


_bag_cpu.defvjp(_bag_cpu_fwd, _bag_cpu_bwd)


def embedding_bag_cpu(table_NV, indices, weights):
  """`embedding_bag` through the fused CPU FFI kernels (f32 table): forward gather_wsum,
  backward gather_dot (dweights) and scatter_outer (dtable). One CPU device only."""
  num_tokens = indices.shape[0]
  idx_TM = indices.reshape(num_tokens, -1).astype(jnp.int32)
  w_TM = weights.reshape(num_tokens, -1)
  out_dtype = jnp.result_type(table_NV, w_TM)
  return _bag_cpu(table_NV, idx_TM, w_TM.astype(jnp.float32)).astype(out_dtype)


def resolve_bag_kernel(kernel: str, *, num_devices: int, table_dtype, platform=None):
  """(impl, reason) for PKM's embedding bag: 'xla' or 'cpu_ffi' (see module docstring).

  Raises KernelError (one line naming model.pkm.kernel) for a setting that cannot run.
  """
  from peer_jax.ops import kernels
  key = "model.pkm.kernel"
  if kernel not in kernels.KERNELS:
    raise kernels.KernelError(f"{key}: unknown value {kernel!r}; expected one of "
                              f"{', '.join(kernels.KERNELS)}")
  platform = platform or kernels.backend_platform()
  if kernel == "pallas":
    raise kernels.KernelError(f"{key}: pallas: there is no Pallas embedding-bag kernel yet "
                              "(use auto or xla)")
  if kernel == "xla":
    return "xla", "requested"
  f32 = jnp.dtype(table_dtype) == jnp.float32
  if kernel == "cpu_ffi":
    if platform != "cpu" or num_devices > 1:
      raise kernels.KernelError(f"{key}: cpu_ffi runs only on one CPU device (backend "
                                f"{platform}, {num_devices} devices)")
    if not f32:
      raise kernels.KernelError(f"{key}: cpu_ffi takes an f32 value table, got "
                                f"{jnp.dtype(table_dtype)}")
    from peer_jax.ops import cpu_kernels
    if not cpu_kernels.available():
      raise kernels.KernelError(f"{key}: cpu_ffi: the CPU FFI kernels are unavailable")
    return "cpu_ffi", "requested"
  if platform == "cpu" and num_devices == 1 and f32:
    return "cpu_ffi", "one CPU device"
  if platform == "cpu":
    return "xla", "a CPU mesh" if num_devices > 1 else "non-f32 table"
  return "xla", "there is no Pallas embedding-bag kernel yet"


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
               kernel: str = "auto", rngs: nnx.Rngs, dtype=jnp.float32):
    from peer_jax.ops.kernels import KERNELS
    if kernel not in KERNELS:
      raise ValueError(f"model.pkm.kernel: unknown value {kernel!r}; expected one of {KERNELS}")
    self.kernel = kernel
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
    from peer_jax import sharding
    from peer_jax.ops import kernels
    ctx = sharding.current_rules()
    table = self.values_NV[...]
    impl, why = resolve_bag_kernel(self.kernel, table_dtype=table.dtype,
                                   num_devices=ctx.mesh.size if ctx is not None else 1)
    kernels.log_choice(impl, why, self.kernel, what="PKM embedding bag")
    idx_TM, w_TM = idx_BTHK.reshape(B * T, -1), w_BTHK.reshape(B * T, -1)
    bag = lambda tab, i, w: embedding_bag(tab, i, w, chunk_size=self.chunk_size)
    if impl == "cpu_ffi" and self.kernel == "auto":  # as PEER: XLA if traced elsewhere
      y_TV = jax.lax.platform_dependent(table, idx_TM, w_TM, cpu=embedding_bag_cpu,
                                        default=bag)
    elif impl == "cpu_ffi":
      y_TV = embedding_bag_cpu(table, idx_TM, w_TM)
    else:
      y_TV = bag(table, idx_TM, w_TM)
    y_BTV = y_TV.reshape(B, T, -1).astype(self.dtype)
    if self.project:
      y_BTV = y_BTV @ self.w_out_VD[...].astype(self.dtype)
    aux = {"expert_indices": idx_BTHK, "expert_weights": w_BTHK}
    return y_BTV, aux
