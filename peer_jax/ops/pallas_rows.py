"""Per-shard row kernels for the D-sharded expert bank on TPU (Pallas, Mosaic).

    pair_dots(table_ND, idx_TM, src_TD)      -> (T, M) f32: src[t] · table[idx[t, m]]
    weighted_rows(table_ND, idx_TM, coef_TM) -> (T, D) f32: Σ_m coef[t, m] · table[idx[t, m]]

The bank (ops/sharded_experts.py) splits D over the model axes, so the pre-activations
need a psum between u·x and the activation, and the fused kernel of pallas_experts.py
(which does both in one pass over whole rows) cannot run there. These two kernels are its
halves, on one table and one D-slice each: the token-major ring of pallas_experts.py (one
row DMA per (token, slot), the next tokens' rows in flight while one is used), so a
row of the (N, D/t) slice is read as its D/t words. The XLA path's `jnp.take` of the same
rows is charged a whole (8, 128) layout tile per row by XLA's TPU cost model (8× the
useful bytes of an f32 row; docs/scaling.md), and materializes the (C, M, D/t) rows in HBM.

Same constraints as the fused kernels: D a multiple of 128 and M of 8 when compiled (any
size in interpret mode); 32-bit or 16-bit tables (16-bit ones read through the packed word
view); tokens zero-padded to `block_tokens`.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from peer_jax.ops.chunking import round_up
from peer_jax.ops.pallas_experts import (DEFAULT_BLOCK_TOKENS, DEFAULT_RING, _col_to_row,
                                         _interpret, _pad_rows, _parity, _row_to_col, _rows,
                                         _to_rows3, _token_ring)


def _dot_rows(rows_MD, src_1D):
  """(1, M): src · each row (pair_dots)."""
  return _col_to_row(jnp.sum(rows_MD * src_1D, axis=1, keepdims=True))


def _sum_rows(rows_MD, coef_1M):
  """(1, D): Σ_m coef[m] · row m (weighted_rows)."""
  return jnp.sum(_row_to_col(coef_1M) * rows_MD, axis=0, keepdims=True)


def _one_table_kernel(combine, block_tokens, m, ring, packed, idx_ref, idxv_ref, in_ref,
                      table_hbm, out_ref, buf, sems, in_s, idxv_s, out_s):
  """Per token t: out[t] = combine(the M fetched rows of t, in[t])."""
  d = buf.shape[-1]
  _to_rows3(in_ref, in_s)
  _to_rows3(idxv_ref, idxv_s)

  def body(t, slot):
    out_s[t] = combine(_rows(buf, slot, m, d, _parity(idxv_s, t, packed), packed), in_s[t])

  _token_ring(idx_ref, (table_hbm,), (buf,), sems, block_tokens, m, ring, body)
  out_ref[...] = out_s[...].reshape(out_ref.shape)


def _ring_call(combine, table_ND, idx_TM, block_in_TC, out_cols, block_tokens, ring, interpret):
  """pallas_call of `_one_table_kernel` with `combine`; returns its (T, out_cols) f32 output."""
  t, m = idx_TM.shape
  n, d = table_ND.shape
  if table_ND.dtype.itemsize not in (2, 4):
    raise ValueError(f"tables must be 32-bit or 16-bit, got {table_ND.dtype}")
  packed = table_ND.dtype.itemsize == 2
  if packed and n % 2:
    raise ValueError(f"16-bit tables need an even number of rows, got N={n}")
  bt = min(block_tokens, round_up(t, 8))
  t_pad = round_up(t, bt)
  idx = _pad_rows(idx_TM.astype(jnp.int32), t_pad)
  block_in = _pad_rows(block_in_TC.astype(jnp.float32), t_pad)
  cin = block_in.shape[1]
  word = jnp.uint32 if packed else jnp.float32
  tok = lambda cols: pl.BlockSpec((bt, cols), lambda i: (i, 0))
  rows3 = lambda cols: pltpu.VMEM((bt, 1, cols), jnp.float32)
  # One 32-bit word per column per fetched row (packed or not), plus the token blocks.
  cost = pl.CostEstimate(flops=int(2 * t_pad * m * d), transcendentals=0,
                         bytes_accessed=int(t_pad * m * (d * 4 + 8) + t_pad * (cin + out_cols) * 4))
  out = pl.pallas_call(
      functools.partial(_one_table_kernel, combine, bt, m, ring, packed),
      grid=(t_pad // bt,),
      in_specs=[pl.BlockSpec((bt * m,), lambda i: (i,), memory_space=pltpu.SMEM),
                tok(m), tok(cin), pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=tok(out_cols),
      out_shape=jax.ShapeDtypeStruct((t_pad, out_cols), jnp.float32),
      scratch_shapes=[pltpu.VMEM((ring, m, 1, d), word), pltpu.SemaphoreType.DMA((1, ring)),
                      rows3(cin), pltpu.VMEM((bt, 1, m), jnp.int32), rows3(out_cols)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      cost_estimate=cost, interpret=_interpret(interpret),
  )(idx.reshape(-1), idx, block_in, table_ND)
  return out[:t]


def pair_dots(table_ND, idx_TM, src_TD, *, block_tokens: int = DEFAULT_BLOCK_TOKENS,
              ring: int = DEFAULT_RING, interpret=None):
  """(T, M) f32: src[t] · table[idx[t, m]] (rows fetched by DMA, computed in f32)."""
  return _ring_call(_dot_rows, table_ND, idx_TM, src_TD, idx_TM.shape[1], block_tokens,
                    ring, interpret)


def weighted_rows(table_ND, idx_TM, coef_TM, *, block_tokens: int = DEFAULT_BLOCK_TOKENS,
                  ring: int = DEFAULT_RING, interpret=None):
  """(T, D) f32: Σ_m coef[t, m] · table[idx[t, m]] (rows fetched by DMA, summed in f32)."""
  return _ring_call(_sum_rows, table_ND, idx_TM, coef_TM, table_ND.shape[1], block_tokens,
                    ring, interpret)
