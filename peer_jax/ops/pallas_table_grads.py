"""The expert-major row backward of the Pallas TPU expert path (pallas_experts.py): the
table gradients du, dv as sorted segment sums, no atomics and no scatter.

The (token, slot) pairs are sorted by expert id outside the kernel (one `lax.sort`, XLA),
and `jnp.searchsorted` gives each block of `block_rows` table rows its segment of sorted
pairs (scalar-prefetched). The kernel walks its segment in chunks of `chunk_pairs`
(metadata DMA'd into SMEM, x / dy rows DMA'd into VMEM, the next chunk in flight while the
current one is summed), adds a·x[tok] into du and b·dy[tok] into dv in an f32 VMEM tile,
and writes each (block_rows, D) tile once, untouched rows as zeros. Used by the fused
kernel's VJP and, alone, by the sharded bank (`table_grads`).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from peer_jax.ops.chunking import round_up as _round_up

DEFAULT_BLOCK_ROWS = 256    # table rows per row-backward grid step
DEFAULT_CHUNK_PAIRS = 128   # sorted pairs per metadata / row-DMA chunk (row backward)


def _bwd_rows_kernel(block_rows, chunk,
                     off_ref, sid_hbm, stok_hbm, sa_hbm, sb_hbm, x_hbm, dy_hbm,
                     du_ref, dv_ref, du_acc, dv_acc, meta_i, meta_f, x_buf, dy_buf, sems):
  """One block of table rows: sum a·x[tok] and b·dy[tok] over its sorted pairs.

  Chunks start at multiples of `chunk` in the sorted arrays (aligned 1D DMAs); pairs of a
  chunk outside [lo, hi) are skipped. Chunk c+1's metadata and rows are fetched while
  chunk c is summed.
  """
  j = pl.program_id(0)
  lo, hi = off_ref[j], off_ref[j + 1]
  first = lo // chunk
  num_chunks = jnp.where(hi > lo, (hi + chunk - 1) // chunk - first, 0)
  base = j * block_rows
  du_acc[...] = jnp.zeros_like(du_acc)
  dv_acc[...] = jnp.zeros_like(dv_acc)

  def meta_copies(c, slot):
    s = pl.ds(pl.multiple_of((first + c) * chunk, chunk), chunk)
    return [pltpu.make_async_copy(sid_hbm.at[s], meta_i.at[slot, 0], sems.at[0, slot]),
            pltpu.make_async_copy(stok_hbm.at[s], meta_i.at[slot, 1], sems.at[0, slot]),
            pltpu.make_async_copy(sa_hbm.at[s], meta_f.at[slot, 0], sems.at[0, slot]),
            pltpu.make_async_copy(sb_hbm.at[s], meta_f.at[slot, 1], sems.at[0, slot])]

  def row_copies(slot, p, tok):
    return [pltpu.make_async_copy(x_hbm.at[pl.ds(tok, 1)], x_buf.at[slot, p], sems.at[1, slot]),
            pltpu.make_async_copy(dy_hbm.at[pl.ds(tok, 1)], dy_buf.at[slot, p], sems.at[1, slot])]

  def bounds(c):
    """Pairs [p0, p1) of chunk c that belong to this block."""
    c0 = (first + c) * chunk
    return jnp.maximum(lo - c0, 0), jnp.minimum(hi - c0, chunk)

  def fetch(c):
    """Metadata of chunk c into SMEM (waited), then its x / dy row DMAs started."""
    slot = c % 2
    copies = meta_copies(c, slot)
    for cp in copies:
      cp.start()
    for cp in copies:
      cp.wait()

    def one(p, carry):
      for cp in row_copies(slot, p, meta_i[slot, 1, p]):
        cp.start()
      return carry

    lax.fori_loop(*bounds(c), one, 0)

  @pl.when(num_chunks > 0)
  def _():
    fetch(0)

  def step(c, carry):
    @pl.when(c + 1 < num_chunks)
    def _():
      fetch(c + 1)

    slot = c % 2

    def one(p, carry):
      for cp in row_copies(slot, p, 0):
        cp.wait()
      r = meta_i[slot, 0, p] - base
      du_acc[r] = du_acc[r] + meta_f[slot, 0, p] * x_buf[slot, p]
      dv_acc[r] = dv_acc[r] + meta_f[slot, 1, p] * dy_buf[slot, p]
      return carry

    lax.fori_loop(*bounds(c), one, 0)
    return carry

  lax.fori_loop(0, num_chunks, step, 0)
  d = du_ref.shape[1]
  du_ref[...] = du_acc[...].reshape(block_rows, d).astype(du_ref.dtype)
  dv_ref[...] = dv_acc[...].reshape(block_rows, d).astype(dv_ref.dtype)


def _table_grads(idx_TM, a_TM, b_TM, x_TD, dy_TD, n, du_dtype, dv_dtype,
                 block_rows, chunk, interpret):
  """du, dv (N, D): sorted segment sums of a·x[tok] and b·dy[tok] per expert id.

  x_TD, dy_TD must be f32 (rows are DMA'd one by one from HBM).
  """
  t, m = idx_TM.shape
  d = x_TD.shape[1]
  br = min(block_rows, _round_up(n, 8))
  n_pad = _round_up(n, br)
  # Sort the (token, slot) pairs by expert id (XLA); one segment per block of rows. One
  # stable sort carries the payloads: argsort + gathers by the order would gather 8M
  # scalars three times, which TPU charges a whole layout tile each (docs/scaling.md).
  pairs = t * m
  tok = lax.broadcasted_iota(jnp.int32, (t, m), 0).reshape(-1)
  sid, stok, sa, sb = lax.sort((idx_TM.reshape(-1).astype(jnp.int32), tok,
                                a_TM.reshape(-1), b_TM.reshape(-1)),
                               num_keys=1, is_stable=True)
  pad = lambda a: jnp.pad(a, (0, _round_up(pairs, chunk) + chunk - pairs))  # chunk DMAs in bounds
  bounds = jnp.arange(0, n_pad + 1, br, dtype=jnp.int32)
  off = jnp.searchsorted(sid, bounds, side="left").astype(jnp.int32)

  row = pl.BlockSpec((br, d), lambda j, off: (j, 0))
  anyspec = pl.BlockSpec(memory_space=pl.ANY)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(n_pad // br,),
      in_specs=[anyspec] * 6, out_specs=[row, row],
      scratch_shapes=[pltpu.VMEM((br, 1, d), jnp.float32), pltpu.VMEM((br, 1, d), jnp.float32),
                      pltpu.SMEM((2, 2, chunk), jnp.int32), pltpu.SMEM((2, 2, chunk), jnp.float32),
                      pltpu.VMEM((2, chunk, 1, d), jnp.float32),
                      pltpu.VMEM((2, chunk, 1, d), jnp.float32),
                      pltpu.SemaphoreType.DMA((2, 2))])
  cost = pl.CostEstimate(
      flops=int(4 * pairs * d), transcendentals=0,
      bytes_accessed=int(pairs * d * 8 + n_pad * d * (jnp.dtype(du_dtype).itemsize
                                                      + jnp.dtype(dv_dtype).itemsize)))
  du, dv = pl.pallas_call(
      functools.partial(_bwd_rows_kernel, br, chunk),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((n_pad, d), du_dtype),
                 jax.ShapeDtypeStruct((n_pad, d), dv_dtype)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      cost_estimate=cost, interpret=interpret,
  )(off, pad(sid), pad(stok), pad(sa), pad(sb), x_TD, dy_TD)
  if n_pad != n:
    du, dv = du[:n], dv[:n]
  return du, dv


def table_grads(idx_TM, a_TM, x_TD, b_TM, dy_TD, n, du_dtype, dv_dtype, *, interpret=False,
                block_rows=DEFAULT_BLOCK_ROWS, chunk_pairs=DEFAULT_CHUNK_PAIRS):
  """du, dv (N, D): Σ a·x[tok] and Σ b·dy[tok] per expert id, the row-backward kernel alone.

  For the sharded bank (ops/sharded_experts.py): the token-major TPU kernels fuse the pair
  dots with the weighted sum, so they cannot host the bank's psum in between; the bank
  uses the row kernels of pallas_rows.py there and this kernel for the table gradients.
  Not differentiable.
  """
  return _table_grads(idx_TM, a_TM.astype(jnp.float32), b_TM.astype(jnp.float32),
                      x_TD.astype(jnp.float32), dy_TD.astype(jnp.float32), n, du_dtype,
                      dv_dtype, block_rows, chunk_pairs, bool(interpret))
