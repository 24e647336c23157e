"""PEER expert path as Pallas TPU (Mosaic) kernels: fused row gathers, sorted segment sums.

Same contract as `peer_experts` (experts.py):

    y[t] = Σ_m w[t,m] · σ(u[i]·x[t]) · v[i],     i = idx[t,m],  m over the H·K slots

Tables u, v (N, D) stay in HBM (`memory_space=pl.ANY`); the kernels fetch the rows they
need by index with one row DMA each, so no (T, H·K, D) gather ever exists in HBM.

Three kernels, all Pallas; only the index bookkeeping between them is plain XLA:

* `_fwd_kernel` (token-major, grid over blocks of `block_tokens` tokens): the block's
  indices arrive in SMEM; a ring of `ring` token slots in VMEM holds the M rows of u and v
  of the next tokens while the current one is computed (row DMAs for token t+ring-1 are in
  flight while token t is used). Per token, in f32 on the VPU: pre = u_rows·x (lane
  reduction), h = σ(pre), y = Σ_m (w·h)_m v_rows[m] (sublane reduction).
* `_bwd_tokens_kernel` (token-major, same ring): recomputes pre and h, and writes
  dx[t] = Σ_m a[t,m] u[i], dw[t,m] = (dy[t]·v[i]) h[t,m], and the two per-pair scalars the
  table gradients need: a[t,m] = σ'(pre) w (dy·v[i]) (du[i] += a x[t]) and
  b[t,m] = w h (dv[i] += b dy[t]).
* `_bwd_rows_kernel` (expert-major, in pallas_table_grads.py, grid over blocks of
  `block_rows` table rows): the (token, slot) pairs sorted by expert id, each row block's
  segment of them summed into du (a·x[tok]) and dv (b·dy[tok]) in an f32 VMEM tile, each
  (block_rows, D) tile written once. No atomics, no scatter.

Backend: TPU (Mosaic): SMEM, DMA semaphores and `make_async_copy` are TPU-only. On CPU the
kernels run in Pallas interpret mode (`interpret=None` picks it there); that is how the
tests check them against `peer_experts_reference`. There is no GPU (Triton / Mosaic GPU)
lowering of these kernels: on GPU use `peer_experts`.

Constraints (checked): D a multiple of 128 and M a multiple of 8 when compiled (interpret
mode takes any size); tokens and table rows are zero-padded to the block sizes.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from peer_jax.ops.chunking import check_expert_args
from peer_jax.ops.chunking import round_up as _round_up
# The expert-major row backward (table gradients) is its own module; names kept here.
from peer_jax.ops.pallas_table_grads import (DEFAULT_BLOCK_ROWS,  # noqa: F401
                                             DEFAULT_CHUNK_PAIRS, table_grads)

DEFAULT_BLOCK_TOKENS = 64   # tokens per forward / token-backward grid step
DEFAULT_RING = 4            # tokens whose rows are in flight (forward, token backward)


def _pad_rows(a, rows):
  pad = rows - a.shape[0]
  return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) if pad else a


def _interpret(interpret):
  if interpret is None:
    from peer_jax.ops.kernels import backend_platform  # compile_tpu targets TPU from a CPU host
    return backend_platform() == "cpu"
  return interpret


def _eye(m):
  return lax.broadcasted_iota(jnp.int32, (m, m), 0) == lax.broadcasted_iota(jnp.int32, (m, m), 1)


def _row_to_col(r_1M):
  """(1, M) -> (M, 1) without a transpose: mask the broadcast with the identity, sum lanes."""
  m = r_1M.shape[1]
  return jnp.sum(jnp.where(_eye(m), jnp.broadcast_to(r_1M, (m, m)), 0.0), axis=1, keepdims=True)


def _col_to_row(c_M1):
  """(M, 1) -> (1, M), the same way (sum over sublanes)."""
  m = c_M1.shape[0]
  return jnp.sum(jnp.where(_eye(m), jnp.broadcast_to(c_M1, (m, m)), 0.0), axis=0, keepdims=True)


# ------------------------------------------------------------------ token-major ring
#
# Mosaic allows a DMA from one row of an HBM (N, D) array (32-bit elements) but not into
# an unaligned sublane of a VMEM buffer, so gathered rows land in (…, M, 1, D) buffers
# (row index on an untiled dim) and are reshaped to (M, D) once loaded. 16-bit tables
# pack two rows per 32-bit sublane: the kernel reads them through a uint32 view
# (N/2, D), fetches the packed word row of row i (i // 2) and keeps the half of parity
# i % 2 (even rows in the low 16 bits). The same holds for the (bt, D) token blocks:
# rows are moved through (bt, 1, D) scratch for dynamic row access.


def _word_view(table_hbm):
  """(ref, packed): the HBM table as 32-bit words; packed means two 16-bit rows per word."""
  if table_hbm.dtype.itemsize == 4:
    return table_hbm, False
  return table_hbm.bitcast(jnp.uint32), True


def _decode(words_MD, parity_M1, packed):
  """f32 rows from fetched words: as is (f32), or the 16-bit half picked by row parity."""
  if not packed:
    return words_MD.astype(jnp.float32)
  lo = lax.bitcast_convert_type(words_MD << 16, jnp.float32)
  hi = lax.bitcast_convert_type(words_MD & jnp.uint32(0xFFFF0000), jnp.float32)
  return jnp.where(parity_M1 == 1, hi, lo)


def _token_ring(idx_ref, tables, bufs, sems, block_tokens, m, ring, body):
  """Runs body(t, slot) for t in [0, block_tokens) with the M rows (as words) of every
  table for token t in bufs[k][slot]; rows of the next ring-1 tokens are fetched meanwhile."""
  views = [_word_view(t) for t in tables]

  def copy(k, slot, j, row):
    ref, packed = views[k]
    src = ref.at[pl.ds(row // 2 if packed else row, 1)]
    return pltpu.make_async_copy(src, bufs[k].at[slot, j], sems.at[k, slot])

  def start(t):
    slot = t % ring

    def one(j, c):
      row = idx_ref[t * m + j]
      for k in range(len(tables)):
        copy(k, slot, j, row).start()
      return c

    lax.fori_loop(0, m, one, 0)

  def wait(t):
    slot = t % ring

    def one(j, c):
      for k in range(len(tables)):
        copy(k, slot, j, 0).wait()
      return c

    lax.fori_loop(0, m, one, 0)

  for t in range(min(ring - 1, block_tokens)):
    start(t)

  def step(t, c):
    @pl.when(t + ring - 1 < block_tokens)
    def _():
      start(t + ring - 1)

    wait(t)
    body(t, t % ring)
    return c

  lax.fori_loop(0, block_tokens, step, 0)


def _rows(buf, slot, m, d, parity_M1, packed):
  return _decode(buf[slot].reshape(m, d), parity_M1, packed)


def _pre_h(activation, u_MD, x_1D):
  """pre (M, 1) = u_rows · x in f32; returns σ(pre), σ'(pre)."""
  pre = jnp.sum(u_MD * x_1D, axis=1, keepdims=True)
  return jax.jvp(activation, (pre,), (jnp.ones_like(pre),))


def _to_rows3(ref, scratch):
  """(bt, C) block -> (bt, 1, C) scratch, for dynamic per-token row access."""
  bt, c = ref.shape
  scratch[...] = ref[...].reshape(bt, 1, c)


def _parity(idxv_s, t, packed):
  if not packed:
    return None
  return _row_to_col((idxv_s[t] % 2).astype(jnp.float32))


def _fwd_kernel(activation, block_tokens, m, ring, packed,
                idx_ref, idxv_ref, x_ref, w_ref, u_hbm, v_hbm, y_ref,
                u_buf, v_buf, sems, x_s, w_s, idxv_s, y_s):
  d = x_ref.shape[1]
  _to_rows3(x_ref, x_s)
  _to_rows3(w_ref, w_s)
  _to_rows3(idxv_ref, idxv_s)

  def body(t, slot):
    par = _parity(idxv_s, t, packed)
    h_M1, _ = _pre_h(activation, _rows(u_buf, slot, m, d, par, packed), x_s[t])
    coef_M1 = _row_to_col(w_s[t]) * h_M1
    y_s[t] = jnp.sum(coef_M1 * _rows(v_buf, slot, m, d, par, packed), axis=0, keepdims=True)

  _token_ring(idx_ref, (u_hbm, v_hbm), (u_buf, v_buf), sems, block_tokens, m, ring, body)
  y_ref[...] = y_s[...].reshape(block_tokens, d).astype(y_ref.dtype)


def _bwd_tokens_kernel(activation, block_tokens, m, ring, packed,
                       idx_ref, idxv_ref, x_ref, w_ref, dy_ref, u_hbm, v_hbm,
                       dx_ref, dw_ref, a_ref, b_ref,
                       u_buf, v_buf, sems, x_s, w_s, idxv_s, dy_s, dx_s, dw_s, a_s, b_s):
  d = x_ref.shape[1]
  _to_rows3(x_ref, x_s)
  _to_rows3(w_ref, w_s)
  _to_rows3(idxv_ref, idxv_s)
  _to_rows3(dy_ref, dy_s)

  def body(t, slot):
    par = _parity(idxv_s, t, packed)
    u_MD = _rows(u_buf, slot, m, d, par, packed)
    h_M1, dh_M1 = _pre_h(activation, u_MD, x_s[t])
    w_M1 = _row_to_col(w_s[t])
    dcoef_M1 = jnp.sum(_rows(v_buf, slot, m, d, par, packed) * dy_s[t], axis=1, keepdims=True)
    a_M1 = dh_M1 * w_M1 * dcoef_M1
    dx_s[t] = jnp.sum(a_M1 * u_MD, axis=0, keepdims=True)
    dw_s[t] = _col_to_row(dcoef_M1 * h_M1)
    a_s[t] = _col_to_row(a_M1)
    b_s[t] = _col_to_row(w_M1 * h_M1)

  _token_ring(idx_ref, (u_hbm, v_hbm), (u_buf, v_buf), sems, block_tokens, m, ring, body)
  for out, s in ((dx_ref, dx_s), (dw_ref, dw_s), (a_ref, a_s), (b_ref, b_s)):
    out[...] = s[...].reshape(out.shape).astype(out.dtype)


def _token_call(kernel, activation, x_TD, idx_TM, w_TM, extra_TD, u_ND, v_ND, outs,
                block_tokens, ring, interpret):
  """pallas_call of a token-major kernel over blocks of block_tokens (inputs padded, f32)."""
  t_pad, d = x_TD.shape
  m = idx_TM.shape[1]
  bt = block_tokens
  packed = u_ND.dtype.itemsize == 2
  if u_ND.dtype.itemsize != v_ND.dtype.itemsize or u_ND.dtype.itemsize not in (2, 4):
    raise ValueError(f"tables must both be 32-bit or both 16-bit, got {u_ND.dtype}, {v_ND.dtype}")
  if packed and u_ND.shape[0] % 2:
    raise ValueError(f"16-bit tables need an even number of rows, got N={u_ND.shape[0]}")
  word = jnp.uint32 if packed else jnp.float32
  tok = lambda cols: pl.BlockSpec((bt, cols), lambda i: (i, 0))
  in_specs = ([pl.BlockSpec((bt * m,), lambda i: (i,), memory_space=pltpu.SMEM),
               tok(m), tok(d), tok(m)] + [tok(d)] * len(extra_TD)
              + [pl.BlockSpec(memory_space=pl.ANY)] * 2)
  out_shape = [jax.ShapeDtypeStruct((t_pad, cols), dt) for cols, dt in outs]
  out_specs = [tok(cols) for cols, _ in outs]
  rows3 = lambda cols: pltpu.VMEM((bt, 1, cols), jnp.float32)
  scratch = ([pltpu.VMEM((ring, m, 1, d), word), pltpu.VMEM((ring, m, 1, d), word),
              pltpu.SemaphoreType.DMA((2, ring)),
              rows3(d), rows3(m), pltpu.VMEM((bt, 1, m), jnp.int32)]
             + [rows3(d)] * len(extra_TD) + [rows3(cols) for cols, _ in outs])
  row_bytes = 2 * d * 4  # one 32-bit word per column and table, packed or not
  cost = pl.CostEstimate(flops=int(4 * t_pad * m * d * (1 + len(extra_TD))),
                         transcendentals=int(t_pad * m),
                         bytes_accessed=int(t_pad * m * row_bytes
                                            + t_pad * d * 4 * (2 + 2 * len(extra_TD))))
  return pl.pallas_call(
      functools.partial(kernel, activation, bt, m, ring, packed),
      grid=(t_pad // bt,),
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, scratch_shapes=scratch,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      cost_estimate=cost, interpret=interpret,
  )(idx_TM.reshape(-1), idx_TM, x_TD, w_TM, *extra_TD, u_ND, v_ND)


# ------------------------------------------------------------------------ custom VJP
# opts = (activation, block_tokens, block_rows, ring, chunk_pairs, interpret), all static.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _peer_pallas(opts, x_TD, idx_TM, w_TM, u_ND, v_ND):
  return _forward(opts, x_TD, idx_TM, w_TM, u_ND, v_ND)


def _f32_padded(a, rows):
  return _pad_rows(a.astype(jnp.float32), rows)


def _forward(opts, x_TD, idx_TM, w_TM, u_ND, v_ND):
  activation, bt, _, ring, _, interpret = opts
  t, d = x_TD.shape
  t_pad = _round_up(t, bt)
  (y,) = _token_call(_fwd_kernel, activation, _f32_padded(x_TD, t_pad), _pad_rows(idx_TM, t_pad),
                     _f32_padded(w_TM, t_pad), (), u_ND, v_ND, [(d, jnp.float32)],
                     bt, ring, interpret)
  return y[:t].astype(jnp.result_type(x_TD, w_TM, u_ND, v_ND))


def _fwd(opts, x_TD, idx_TM, w_TM, u_ND, v_ND):
  return _forward(opts, x_TD, idx_TM, w_TM, u_ND, v_ND), (x_TD, idx_TM, w_TM, u_ND, v_ND)


def _bwd(opts, res, dy_TD):
  activation, bt, br, ring, chunk, interpret = opts
  x_TD, idx_TM, w_TM, u_ND, v_ND = res
  t, d = x_TD.shape
  m = idx_TM.shape[1]
  t_pad = _round_up(t, bt)
  x32, dy32 = _f32_padded(x_TD, t_pad), _f32_padded(dy_TD, t_pad)
  outs = [(d, jnp.float32)] + [(m, jnp.float32)] * 3
  dx, dw, a, b = _token_call(
      _bwd_tokens_kernel, activation, x32, _pad_rows(idx_TM, t_pad), _f32_padded(w_TM, t_pad),
      (dy32,), u_ND, v_ND, outs, bt, ring, interpret)
  du, dv = table_grads(idx_TM, a[:t], x32, b[:t], dy32, u_ND.shape[0], u_ND.dtype,
                       v_ND.dtype, interpret=interpret, block_rows=br, chunk_pairs=chunk)
  return dx[:t].astype(x_TD.dtype), None, dw[:t].astype(w_TM.dtype), du, dv


_peer_pallas.defvjp(_fwd, _bwd)


def peer_experts_pallas(x, indices, weights, u, v, activation=jax.nn.gelu, *, interpret=None,
                        block_tokens=DEFAULT_BLOCK_TOKENS, block_rows=DEFAULT_BLOCK_ROWS,
                        ring=DEFAULT_RING, chunk_pairs=DEFAULT_CHUNK_PAIRS):
  """PEER expert mixture as Pallas TPU kernels; same semantics as `peer_experts`.

  Args:
    x: (T, D) tokens.
    indices: (T, H, K) integer expert ids in [0, N), not range-checked (an out-of-range
      id makes the kernel DMA from outside the table).
    weights: (T, H, K) router weights.
    u, v: (N, D) expert tables (f32 or bf16; all arithmetic is f32).
    activation: elementwise function, static (traced into the kernels, differentiated
      there with jax.jvp).
    interpret: None = Pallas interpret mode on CPU, compiled (Mosaic) elsewhere.
    block_tokens: tokens per forward / token-backward grid step (multiple of 8).
    block_rows: table rows per row-backward grid step (multiple of 8).
    ring: tokens whose rows are fetched ahead in the token-major kernels (>= 2).
    chunk_pairs: sorted pairs per chunk in the row-backward kernel.
  """
  t, d = x.shape
  check_expert_args(x, indices, weights, u, v)
  interpret = _interpret(interpret)
  m = indices[0].size
  if not interpret and (d % 128 or m % 8):
    raise ValueError(f"compiled Pallas kernels need D % 128 == 0 and H·K % 8 == 0, got D={d}, "
                     f"H·K={m}")
  if block_tokens % 8 or block_rows % 8 or ring < 2:
    raise ValueError("block_tokens and block_rows must be multiples of 8, ring >= 2")
  bt = min(block_tokens, _round_up(t, 8))
  opts = (activation, bt, block_rows, min(ring, bt), chunk_pairs, interpret)
  idx_TM = indices.reshape(t, m).astype(jnp.int32)
  w_TM = weights.reshape(t, m)
  return _peer_pallas(opts, x, idx_TM, w_TM, u, v)
