"""The PEER expert path on CPU through fused FFI kernels (cpu_experts.cc).

Same contract as `peer_experts` / `peer_experts_glu` (experts.py), built from three
kernels that never materialise a (tokens, M, D) gather:

    pre[t, m] = table[idx[t, m]] · x[t]              gather_dot
    y[t]      = Σ_m coef[t, m] · v[idx[t, m]]        gather_wsum
    dT        = zeros(N, D); dT[idx[t, m]] += a[t, m] · x[t]    scatter_outer

The activation, router weights and their derivatives stay in JAX on (T, M) arrays, so any
activation works and autodiff supplies σ'. Residuals are the inputs plus the (T, M)
pre-activations; temporaries are (T, M) and (T, D), with no chunking needed. f32 only.
`peer_experts_cpu` is selected by `experts.peer_experts(..., fast_cpu=True)` through
`lax.platform_dependent`, so GPU/TPU programs keep the XLA path.
"""

import functools

import jax
import jax.numpy as jnp

from peer_jax.ops.chunking import hidden

F32 = jnp.float32


def gather_dot(table_ND, idx_TM, x_TD):
  """(T, M): table[idx[t, m]] · x[t]."""
  return jax.ffi.ffi_call("peer_jax_gather_dot_f32", jax.ShapeDtypeStruct(idx_TM.shape, F32),
                          vmap_method="sequential")(table_ND, idx_TM, x_TD)


def gather_wsum(table_ND, idx_TM, coef_TM):
  """(T, D): Σ_m coef[t, m] · table[idx[t, m]]."""
  shape = (idx_TM.shape[0], table_ND.shape[1])
  return jax.ffi.ffi_call("peer_jax_gather_wsum_f32", jax.ShapeDtypeStruct(shape, F32),
                          vmap_method="sequential")(table_ND, idx_TM, coef_TM)


def scatter_outer(num_rows, idx_TM, a_TM, x_TD):
  """(N, D) zeros with a[t, m] · x[t] added into row idx[t, m]."""
  shape = (num_rows, x_TD.shape[1])
  return jax.ffi.ffi_call("peer_jax_scatter_outer_f32", jax.ShapeDtypeStruct(shape, F32),
                          vmap_method="sequential")(idx_TM, a_TM, x_TD)


def _forward(activation, x_TD, idx_TM, w_TM, ins, v_ND):
  pre = tuple(gather_dot(t, idx_TM, x_TD) for t in ins)
  coef_TM = w_TM * hidden(activation, pre)
  return gather_wsum(v_ND, idx_TM, coef_TM), pre


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _peer_cpu(activation, x_TD, idx_TM, w_TM, ins, v_ND):
  return _forward(activation, x_TD, idx_TM, w_TM, ins, v_ND)[0]


def _peer_cpu_fwd(activation, x_TD, idx_TM, w_TM, ins, v_ND):
  y_TD, pre = _forward(activation, x_TD, idx_TM, w_TM, ins, v_ND)
  return y_TD, (x_TD, idx_TM, w_TM, ins, v_ND, pre)


def _peer_cpu_bwd(activation, res, dy_TD):
  x_TD, idx_TM, w_TM, ins, v_ND, pre = res
  h_TM, h_vjp = jax.vjp(lambda *p: hidden(activation, p), *pre)
  dcoef_TM = gather_dot(v_ND, idx_TM, dy_TD)
  dw_TM = dcoef_TM * h_TM
  dpre = h_vjp(dcoef_TM * w_TM)
  dx_TD = sum(gather_wsum(t, idx_TM, dp) for t, dp in zip(ins, dpre))
  dins = tuple(scatter_outer(t.shape[0], idx_TM, dp, x_TD) for t, dp in zip(ins, dpre))
  dv_ND = scatter_outer(v_ND.shape[0], idx_TM, w_TM * h_TM, dy_TD)
  return dx_TD, None, dw_TM, dins, dv_ND


_peer_cpu.defvjp(_peer_cpu_fwd, _peer_cpu_bwd)


def peer_experts_cpu(activation, x_TD, idx_TM, w_TM, ins, v_ND):
  """y (T, D) for f32 x (T, D), int32 idx / f32 w (T, M), tables `ins` (u or (u, g)) and v."""
  return _peer_cpu(activation, x_TD, idx_TM, w_TM, tuple(ins), v_ND)
