"""A faster top-k on CPU: a multi-threaded XLA FFI kernel (cpu_topk.cc) behind `top_k`.

XLA:CPU's TopK is single-threaded with a fixed ~2 us cost per row; at the PEER reference
size (T·h = 16384 rows of n = 1024 sub-key scores, three top-k's per layer) it is the
largest part of the retrieval. `top_k(x, k)` returns exactly what `lax.top_k(x, k)` does
(same order, ties to the lower index) and uses the kernel when it can: f32 input,
1 <= k <= n, traced for the CPU (`lax.platform_dependent`: on GPU and TPU the program uses
`lax.top_k`, so AOT compiles for TPU never see the custom call), and the kernel library
built (`peer_jax.ops.cpu_kernels`: compiled at first use; if that fails, `lax.top_k`).
The custom call has no partitioning rule: use it in single-device programs only.
"""

import jax
import jax.numpy as jnp
from jax import lax

from peer_jax.ops import cpu_kernels

_TARGET = "peer_jax_topk_f32"


def _ffi_top_k(x, k):
  shape = x.shape[:-1] + (k,)
  call = jax.ffi.ffi_call(
      _TARGET,
      (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.int32)),
      # Rows are independent: a vmapped call is the same kernel over more rows.
      vmap_method="broadcast_all")
  values, indices = call(x)
  return values, indices


def top_k(x, k: int):
  """`lax.top_k(x, k)` over the last axis: (values, int32 indices), descending.

  Not differentiable (callers stop gradients and route them through the indices, as
  `product_key_topk` does).
  """
  k = int(k)
  if (x.dtype != jnp.float32 or x.ndim == 0 or not 1 <= k <= x.shape[-1]
      or not cpu_kernels.available()):
    return lax.top_k(x, k)
  x = lax.stop_gradient(x)
  return lax.platform_dependent(
      x, cpu=lambda a: _ffi_top_k(a, k), default=lambda a: tuple(lax.top_k(a, k)))
