"""Singleton experts (PEER): gather, activate, weighted sum, with a hand-written VJP.

For token t with retrieved experts indices[t, h, k] and router weights weights[t, h, k]:

    y[t] = Σ_h Σ_k weights[t,h,k] · σ(u[i]·x[t]) · v[i],     i = indices[t,h,k]

The naive form gathers u[indices] and v[indices] as (T, H·K, D) tensors; at paper scale
that is ~137 GB per layer, and autodiff keeps them alive as residuals. `peer_experts`
instead walks the tokens in chunks of `chunk_size`: the forward is a `lax.map` over
chunks, and the backward (a `jax.custom_vjp`) is a `lax.scan` over chunks that
re-gathers each chunk's rows and scatter-adds the table gradients into dense (N, D)
accumulators carried through the scan. Residuals are only the inputs, so peak
temporary memory depends on `chunk_size`, not on the number of tokens.

Numerics: dot products, activations and the table-gradient accumulators use at least
f32 (bf16 inputs are upcast after the gather and results cast back at the end), since
summing many small per-token contributions into a bf16 table gradient loses them.

The GLU variant `peer_experts_glu` uses experts σ(g[i]·x) · (u[i]·x) · v[i] and shares
the same machinery: both are "hidden = f(pre-activations of some input tables)".
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from peer_jax.ops import cpu_kernels
# check_expert_args is also imported from here by callers.
from peer_jax.ops.chunking import (acc_dtype, check_expert_args, clamp_chunk, flat_routing,
                                   from_chunks, hidden, map_chunks, to_chunks)

# Tokens per chunk. Peak temporaries are ~4 (chunk, H·K, D) f32 buffers (two gathers,
# two gradient-row blocks): at the paper's H·K = 128, D = 1024 that is 0.5 GiB at 256,
# small next to the 8 GiB of f32 table gradients at N = 1024². On CPU, 256 / 512 / 1024
# measured within noise of each other in fwd+bwd time (T=2048, D=256, H·K=128, N=1024²).
DEFAULT_CHUNK_SIZE = 256


# ----------------------------------------------------------------------------- helpers


def _gather_pre(x_CD, idx_CM, table_ND, acc):
  """Gathered rows (C, M, D) of one table and their dot with each token, (C, M)."""
  rows_CMD = table_ND.at[idx_CM].get(mode="promise_in_bounds")
  pre_CM = jnp.einsum("cd,cmd->cm", x_CD, rows_CMD, preferred_element_type=acc)
  return rows_CMD, pre_CM


# ------------------------------------------------------------------- chunked kernels


def _chunk_forward(activation, x_CD, idx_CM, w_CM, ins, v_ND):
  acc = acc_dtype(x_CD, w_CM, v_ND, *ins)
  pre = tuple(_gather_pre(x_CD, idx_CM, t, acc)[1] for t in ins)
  coef_CM = w_CM.astype(acc) * hidden(activation, pre)
  v_CMD = v_ND.at[idx_CM].get(mode="promise_in_bounds")
  return jnp.einsum("cm,cmd->cd", coef_CM, v_CMD, preferred_element_type=acc)


def _forward(activation, chunk_size, x_TD, idx_TM, w_TM, ins, v_ND):
  y_TD = map_chunks(lambda c: _chunk_forward(activation, *c, ins, v_ND), (x_TD, idx_TM, w_TM),
                    chunk_size)
  return y_TD.astype(jnp.result_type(x_TD, w_TM, v_ND, *ins))


def _chunk_backward(activation, carry, chunk, ins, v_ND):
  """One chunk of the VJP: returns updated table-gradient accumulators, dx, dw."""
  dins_ND, dv_ND = carry
  x_CD, idx_CM, w_CM, dy_CD = chunk
  acc = dv_ND.dtype
  x_CD, w_CM, dy_CD = x_CD.astype(acc), w_CM.astype(acc), dy_CD.astype(acc)

  gathered = [_gather_pre(x_CD, idx_CM, t, acc) for t in ins]
  pre = tuple(p for _, p in gathered)
  h_CM, h_vjp = jax.vjp(lambda *p: hidden(activation, p), *pre)
  v_CMD = v_ND.at[idx_CM].get(mode="promise_in_bounds")

  dcoef_CM = jnp.einsum("cd,cmd->cm", dy_CD, v_CMD, preferred_element_type=acc)
  dw_CM = dcoef_CM * h_CM
  dpre = h_vjp(dcoef_CM * w_CM)
  dx_CD = sum(jnp.einsum("cm,cmd->cd", dp, rows, preferred_element_type=acc)
              for dp, (rows, _) in zip(dpre, gathered))

  # Per-(token, expert) gradient rows, summed into the tables. Duplicate indices
  # (many tokens choosing one expert) must add up, hence scatter-add, not set.
  idx_flat = idx_CM.reshape(-1)
  d = x_CD.shape[-1]
  dins_ND = tuple(
      dt.at[idx_flat].add((dp[:, :, None] * x_CD[:, None, :]).reshape(-1, d),
                         mode="promise_in_bounds")
      for dt, dp in zip(dins_ND, dpre))
  dv_ND = dv_ND.at[idx_flat].add(((w_CM * h_CM)[:, :, None] * dy_CD[:, None, :]).reshape(-1, d),
                               mode="promise_in_bounds")
  return (dins_ND, dv_ND), (dx_CD, dw_CM)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _peer(activation, chunk_size, x_TD, idx_TM, w_TM, ins, v_ND):
  return _forward(activation, chunk_size, x_TD, idx_TM, w_TM, ins, v_ND)


def _peer_fwd(activation, chunk_size, x_TD, idx_TM, w_TM, ins, v_ND):
  y_TD = _forward(activation, chunk_size, x_TD, idx_TM, w_TM, ins, v_ND)
  # Only the inputs: every gathered row is recomputed chunk by chunk in the backward.
  return y_TD, (x_TD, idx_TM, w_TM, ins, v_ND)


# Initial values of the dense (N, D) table-gradient accumulators. Two identical zero
# broadcasts get merged by XLA's CSE, and since both accumulators are updated in place in
# the scan it then copies one (a full extra read + write of an (N, D) buffer: measured
# ~1.2x on the whole fwd+bwd at N = 1024², docs/performance.md). Starting the input table's
# accumulator from -0.0 keeps them distinct: -0.0 + x == x, and untouched rows hold -0.0,
# which compares equal to 0 (v's, and GLU's g, stay +0.0).
_ZERO_INIT = (-0.0, 0.0)


def _peer_bwd(activation, chunk_size, res, dy_TD):
  x_TD, idx_TM, w_TM, ins, v_ND = res
  num_tokens = x_TD.shape[0]
  acc = acc_dtype(x_TD, w_TM, v_ND, *ins)
  init = (tuple(jnp.full(t.shape, _ZERO_INIT[i % 2], acc) for i, t in enumerate(ins)),
          jnp.zeros(v_ND.shape, acc))
  chunks = tuple(to_chunks(a, chunk_size) for a in (x_TD, idx_TM, w_TM, dy_TD))
  body = lambda carry, chunk: _chunk_backward(activation, carry, chunk, ins, v_ND)
  (dins, dv_ND), (dx_nCD, dw_nCM) = lax.scan(body, init, chunks)
  dx_TD = from_chunks(dx_nCD, num_tokens).astype(x_TD.dtype)
  dw_TM = from_chunks(dw_nCM, num_tokens).astype(w_TM.dtype)
  dins = tuple(d.astype(t.dtype) for d, t in zip(dins, ins))
  return dx_TD, None, dw_TM, dins, dv_ND.astype(v_ND.dtype)


_peer.defvjp(_peer_fwd, _peer_bwd)


def _call(x, indices, weights, ins, v, activation, chunk_size, fast_cpu=False):
  check_expert_args(x, indices, weights, *ins, v)
  idx_TM, w_TM = flat_routing(indices, weights)
  chunk_size = clamp_chunk(chunk_size, x.shape[0])
  xla_path = lambda *a: _peer(activation, chunk_size, *a)
  arrays = (x, idx_TM, w_TM, tuple(ins), v)
  if (fast_cpu and all(a.dtype == jnp.float32 for a in (x, w_TM, v, *ins))
      and cpu_kernels.available()):
    # The fused FFI kernels on CPU (same values up to summation order); XLA elsewhere.
    from peer_jax.ops.cpu_experts import peer_experts_cpu
    return lax.platform_dependent(
        *arrays, cpu=lambda *a: peer_experts_cpu(activation, *a), default=xla_path)
  return xla_path(*arrays)


# ------------------------------------------------------------------------ public API


def peer_experts(x, indices, weights, u, v, activation=jax.nn.gelu, *,
                 chunk_size=DEFAULT_CHUNK_SIZE, fast_cpu=False):
  """PEER expert mixture, chunked over tokens with a memory-lean custom VJP.

  Args:
    x: (T, D) tokens.
    indices: (T, H, K) integer expert ids in [0, N). They are not range-checked
      (gathers and scatters use mode='promise_in_bounds'): out-of-range ids give
      unspecified results.
    weights: (T, H, K) router weights.
    u, v: (N, D) expert input / output tables.
    activation: elementwise function (static, not differentiated w.r.t. itself);
      pass the same function object across calls to avoid retracing.
    chunk_size: tokens per chunk (static); bounds temporary memory.
    fast_cpu: on CPU with f32 inputs, use the fused multi-threaded FFI kernels
      (`peer_jax.ops.cpu_experts`) instead; single-device programs only (the custom
      calls have no partitioning rule).

  Returns:
    y: (T, D), y[t] = Σ_{h,k} w[t,h,k] · activation(u[i]·x[t]) · v[i], i = indices[t,h,k].
  """
  return _call(x, indices, weights, (u,), v, activation, chunk_size, fast_cpu)


def peer_experts_glu(x, indices, weights, u, g, v, activation=jax.nn.gelu, *,
                     chunk_size=DEFAULT_CHUNK_SIZE, fast_cpu=False):
  """GLU variant: y[t] = Σ w · activation(g[i]·x[t]) · (u[i]·x[t]) · v[i].

  `g` (N, D) is the gate table, `u` the linear ("up") table. Same chunking as
  `peer_experts`; one extra gather and table gradient.
  """
  return _call(x, indices, weights, (u, g), v, activation, chunk_size, fast_cpu)


def peer_experts_reference(x, indices, weights, u, v, activation=jax.nn.gelu):
  """Naive gather-einsum; materialises (T, H, K, D) gathers. For tests only."""
  u_THKD, v_THKD = u[indices], v[indices]
  h_THK = activation(jnp.einsum("td,thkd->thk", x, u_THKD))
  return jnp.einsum("thk,thkd->td", weights * h_THK, v_THKD)


def peer_experts_glu_reference(x, indices, weights, u, g, v, activation=jax.nn.gelu):
  """Naive gather-einsum for the GLU variant. For tests only."""
  up_THK = jnp.einsum("td,thkd->thk", x, u[indices])
  gate_THK = jnp.einsum("td,thkd->thk", x, g[indices])
  return jnp.einsum("thk,thkd->td", weights * activation(gate_THK) * up_THK, v[indices])
