"""The embedding bag: y[t] = Σ_m w[t, m] · table[idx[t, m]] (PKM's value read-out).

An EmbeddingBag with per-sample weights, differentiable in the table and the weights.
`embedding_bag` is chunked over tokens with a hand-written VJP, like `peer_experts`: the
forward never holds more than (chunk, M, V) gathered rows, and the backward scatter-adds
the table gradient into one dense accumulator carried through a scan (no per-chunk (N, V)
temporaries). The chunking is `ops/chunking.py`'s.

The bag is PEER's weighted-sum half, so the fused CPU FFI kernels apply as they are
(`embedding_bag_cpu`: gather_wsum forward, gather_dot and scatter_outer backward).
`resolve_bag_kernel` is the kernel switch `model.pkm.kernel` for it: `cpu_ffi`, and `auto`
on one CPU device with an f32 table; there is no Pallas embedding-bag kernel yet.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from peer_jax.ops.chunking import (acc_dtype, clamp_chunk, flat_routing, from_chunks,
                                   map_chunks, to_chunks)


def _bag_forward(chunk_size, table_NV, idx_TM, w_TM):
  acc = acc_dtype(table_NV, w_TM)

  def body(c):
    idx_CM, w_CM = c
    rows_CMV = jnp.take(table_NV, idx_CM, axis=0)
    return jnp.einsum("cm,cmv->cv", w_CM.astype(acc), rows_CMV, preferred_element_type=acc)

  y_TV = map_chunks(body, (idx_TM, w_TM), chunk_size)
  return y_TV.astype(jnp.result_type(table_NV, w_TM))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bag(chunk_size, table_NV, idx_TM, w_TM):
  return _bag_forward(chunk_size, table_NV, idx_TM, w_TM)


def _bag_fwd(chunk_size, table_NV, idx_TM, w_TM):
  return _bag_forward(chunk_size, table_NV, idx_TM, w_TM), (table_NV, idx_TM, w_TM)


def _bag_bwd(chunk_size, res, dy_TV):
  table_NV, idx_TM, w_TM = res
  acc = acc_dtype(table_NV, w_TM)

  def body(dtable_NV, c):
    idx_CM, w_CM, dy_CV = c
    dy_CV = dy_CV.astype(acc)
    rows_CMV = jnp.take(table_NV, idx_CM, axis=0)
    dw_CM = jnp.einsum("cv,cmv->cm", dy_CV, rows_CMV, preferred_element_type=acc)
    upd = (w_CM.astype(acc)[:, :, None] * dy_CV[:, None, :]).reshape(-1, dy_CV.shape[-1])
    return dtable_NV.at[idx_CM.reshape(-1)].add(upd), dw_CM

  chunks = tuple(to_chunks(a, chunk_size) for a in (idx_TM, w_TM, dy_TV))
  dtable_NV, dw = lax.scan(body, jnp.zeros(table_NV.shape, acc), chunks)
  dw_TM = from_chunks(dw, idx_TM.shape[0]).astype(w_TM.dtype)
  # Integer indices get a float0 cotangent.
  didx = jnp.zeros(idx_TM.shape, jax.dtypes.float0)
  return dtable_NV.astype(table_NV.dtype), didx, dw_TM


_bag.defvjp(_bag_fwd, _bag_bwd)


def embedding_bag(table_NV, indices, weights, *, chunk_size: int = 512):
  """y[t] = Σ_m weights[t, m] · table[indices[t, m]], chunked over tokens.

  indices/weights: (T, ...) (trailing dims flattened); returns (T, V). Differentiable in
  table and weights.
  """
  idx_TM, w_TM = flat_routing(indices, weights)
  chunk_size = clamp_chunk(chunk_size, idx_TM.shape[0])
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
  idx_TM, w_TM = flat_routing(indices, weights)
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
    from peer_jax.ops import cpu_kernels
    # available() also registers the FFI targets: without it a first PKM trace in a fresh
    # process would name a handler XLA does not know.
    if cpu_kernels.available():
      return "cpu_ffi", "one CPU device"
    return "xla", "the CPU FFI kernels are unavailable"
  if platform == "cpu":
    return "xla", "a CPU mesh" if num_devices > 1 else "non-f32 table"
  return "xla", "there is no Pallas embedding-bag kernel yet"


def embedding_bag_reference(table_NV, indices, weights):
  """Naive gather + weighted sum. For tests only."""
  t = indices.shape[0]
  return jnp.einsum("tm,tmv->tv", weights.reshape(t, -1), table_NV[indices.reshape(t, -1)])
