"""PEER expert path as Pallas GPU (Triton) kernels: index-gathered rows, sorted segment sums.

Same contract as `peer_experts` (experts.py) and the TPU kernels (pallas_experts.py):

    y[t] = Σ_m w[t,m] · σ(u[i]·x[t]) · v[i],     i = idx[t,m],  m over the H·K slots

In the Triton backend a kernel's refs are pointers into HBM, so the tables u, v (N, D) are
passed whole and rows are gathered by index inside the kernels: `table_ref[ids, cols]` with
an index vector `ids` is one vector-indexed (pointer-arithmetic) load of `len(ids)` row
slices. No (T, H·K, D) gather ever exists in HBM. All arithmetic is f32 (tables may be
bf16; a bf16 row costs half the bytes of an f32 one). Pairs p = t·M + m are token-major.

Three kernels, all Pallas; only index bookkeeping between them is XLA:

* `_pair_kernel` (grid over blocks of `block_pairs` pairs, loop over D in `block_d`
  columns): per pair the fused gather + dot, pre = x[t]·u[i] (and, in the backward,
  dy[t]·v[i]), then an elementwise epilogue on the pair scalars: forward c = w σ(pre);
  backward dw = (dy·v[i]) h, a = σ'(pre) w (dy·v[i]), b = w h (h = σ(pre)).
* `_rows_kernel` (grid over (blocks of `block_tokens` tokens, blocks of `block_d`
  columns), loop over the M slots): gather + weighted sum, out[t] = Σ_m c[t,m] table[i].
  Forward y = rows(c, v); backward dx = rows(a, u).
* `_segment_kernel` (grid over (blocks of `block_rows` table rows, blocks of `block_d`
  columns)): the sorted segment sum for du[i] = Σ a x[tok], dv[i] = Σ b dy[tok]. The
  (token, slot) pairs are sorted by expert id in XLA (`argsort`), `searchsorted` gives each
  row block its segment [off[j], off[j+1]) of sorted pairs; the kernel walks it in chunks
  of `chunk_pairs`, gathers the chunk's x / dy rows, and adds them into its (block_rows,
  block_d) f32 accumulators with a one-hot matmul (onehot[r, p] = [sid[p] == base + r],
  exact: the one-hot factor is 0/1 and the dot runs in IEEE f32). Each row block writes its
  tile of du and dv once, untouched rows as zeros. No atomics, no scatter, no zero-init.

Backend: Triton (`pl.pallas_call` with a plain grid, `plgpu.CompilerParams`), compiled on
GPU; `interpret=None` picks Pallas interpret mode on CPU, which is how the tests check it
against `peer_experts_reference`. Lowering to Triton IR runs in Python and is checked
without a GPU by `jax.export(..., platforms=["cuda"])` (tests/test_pallas_gpu.py); Triton's
own compile to PTX happens in XLA on a GPU and has not been run here.

Shapes: Triton tensors have power-of-2 sizes, so block sizes are powers of 2 and the column
block is the largest power of 2 <= block_d dividing D (compiled mode needs D % 16 == 0 for
the one-hot matmul). Tokens are zero-padded to the token / pair blocks (inert: weight 0,
cotangent 0). If block_rows does not divide N the table gradients are computed on N padded
up and sliced (one extra copy of du, dv); N = 1024² with the defaults needs none.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from peer_jax.ops.chunking import check_expert_args

# Untuned first guesses (no GPU was available when this was written): small register
# tiles, (32..16, 128) f32, and many programs in flight to hide the gather latency.
DEFAULT_BLOCK_TOKENS = 16   # tokens per program, weighted-row-sum kernel
DEFAULT_BLOCK_PAIRS = 32    # (token, slot) pairs per program, pair-dot kernel
DEFAULT_BLOCK_ROWS = 16     # table rows per program, segment-sum kernel (>= 16: tl.dot)
DEFAULT_BLOCK_D = 128       # columns per tile, all kernels
DEFAULT_CHUNK_PAIRS = 16    # sorted pairs per one-hot matmul, segment-sum kernel (>= 16)
DEFAULT_NUM_WARPS = 4


def _round_up(n, m):
  return -(-n // m) * m


def _pow2(n):
  return n > 0 and n & (n - 1) == 0


def _col_block(d, block_d):
  """Largest power of 2 <= block_d that divides D."""
  return math.gcd(d, 1 << (block_d.bit_length() - 1))


def _interpret(interpret):
  if interpret is None:
    from peer_jax.ops.kernels import backend_platform  # compile_tpu targets TPU from a CPU host
    return backend_platform() == "cpu"
  return interpret


def _pad_rows(a, rows):
  pad = rows - a.shape[0]
  return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) if pad else a


# ---------------------------------------------------------------------------- kernels


def _pair_kernel(epilogue, m, bp, bd, n_dots, idx_ref, w_ref, *refs):
  """Per pair p of this block: pre_k = src_k[p // m] · table_k[idx[p]], then epilogue."""
  srcs, outs = refs[:2 * n_dots], refs[2 * n_dots:]
  d = srcs[0].shape[1]
  p0 = pl.program_id(0) * bp
  ids = idx_ref[pl.ds(p0, bp)]
  tok = (p0 + lax.iota(jnp.int32, bp)) // m

  def body(c, pres):
    cols = pl.ds(pl.multiple_of(c * bd, bd), bd)
    return tuple(pre + jnp.sum(srcs[2 * k][tok, cols].astype(jnp.float32)
                               * srcs[2 * k + 1][ids, cols].astype(jnp.float32), axis=1)
                 for k, pre in enumerate(pres))

  pres = lax.fori_loop(0, d // bd, body, (jnp.zeros((bp,), jnp.float32),) * n_dots)
  vals = epilogue(w_ref[pl.ds(p0, bp)].astype(jnp.float32), *pres)
  for out, val in zip(outs, vals):
    out[pl.ds(p0, bp)] = val


def _rows_kernel(m, bt, bd, idx_ref, c_ref, table_ref, out_ref):
  """out[t, cols] = Σ_j c[j, t] · table[idx[j, t], cols] (idx, c slot-major: (M, T))."""
  t0 = pl.program_id(0) * bt
  cols = pl.ds(pl.program_id(1) * bd, bd)

  def body(j, acc):
    ids = idx_ref[j, pl.ds(t0, bt)]
    coef = c_ref[j, pl.ds(t0, bt)]
    return acc + coef[:, None] * table_ref[ids, cols].astype(jnp.float32)

  acc = lax.fori_loop(0, m, body, jnp.zeros((bt, bd), jnp.float32))
  out_ref[pl.ds(t0, bt), cols] = acc.astype(out_ref.dtype)


def _segment_kernel(br, chunk, bd, off_ref, sid_ref, tok_ref, a_ref, b_ref, x_ref, dy_ref,
                    du_ref, dv_ref):
  """Rows [j·br, (j+1)·br) of du, dv: one-hot matmuls over the block's sorted pairs.

  Chunks start at off[j] + c·chunk; pairs of a chunk past the segment belong to later
  rows (ids sorted) or are padding (id -1), so the one-hot test alone excludes them.
  """
  j = pl.program_id(0)
  cols = pl.ds(pl.program_id(1) * bd, bd)
  lo, hi = off_ref[j], off_ref[j + 1]
  base = j * br
  row = lax.broadcasted_iota(jnp.int32, (br, chunk), 0)

  def body(c, accs):
    s = pl.ds(lo + c * chunk, chunk)
    onehot = (row == (sid_ref[s] - base)[None, :]).astype(jnp.float32)
    tok = tok_ref[s]
    du, dv = accs
    du = du + jnp.dot(onehot, a_ref[s][:, None] * x_ref[tok, cols],
                      precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    dv = dv + jnp.dot(onehot, b_ref[s][:, None] * dy_ref[tok, cols],
                      precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return du, dv

  zeros = jnp.zeros((br, bd), jnp.float32)
  du, dv = lax.fori_loop(0, (hi - lo + chunk - 1) // chunk, body, (zeros, zeros))
  du_ref[pl.ds(base, br), cols] = du.astype(du_ref.dtype)
  dv_ref[pl.ds(base, br), cols] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------- calls
# opts = (activation, block_tokens, block_pairs, block_rows, block_d, chunk_pairs,
#         num_warps, interpret), all static.


def _call(opts, kernel, grid, out_shape, *args, bytes_accessed=0, flops=0):
  *_, num_warps, interpret = opts
  return pl.pallas_call(
      kernel, grid=grid, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
      cost_estimate=pl.CostEstimate(flops=int(flops), transcendentals=0,
                                    bytes_accessed=int(bytes_accessed)),
      interpret=interpret)(*args)


def _pair_call(opts, epilogue, n_outs, idx_P, w_P, srcs):
  """Pair scalars (n_outs × (P,)) from the dots src[p // M] · table[idx[p]]."""
  bp, bd = opts[2], opts[4]
  pairs = idx_P.shape[0]
  m = pairs // srcs[0][0].shape[0]
  flat = [a for pair in srcs for a in pair]
  row_bytes = sum(s.dtype.itemsize + t.dtype.itemsize for s, t in srcs) * srcs[0][0].shape[1]
  return _call(opts, functools.partial(_pair_kernel, epilogue, m, bp, bd, len(srcs)),
               (pairs // bp,), [jax.ShapeDtypeStruct((pairs,), jnp.float32)] * n_outs,
               idx_P, w_P, *flat, bytes_accessed=pairs * row_bytes,
               flops=2 * pairs * srcs[0][0].shape[1] * len(srcs))


def _rows_call(opts, idx_TM, c_TM, table_ND):
  """(T, D) f32: out[t] = Σ_m c[t, m] table[idx[t, m]]."""
  bt, bd = opts[1], opts[4]
  t, m = idx_TM.shape
  d = table_ND.shape[1]
  return _call(opts, functools.partial(_rows_kernel, m, bt, bd), (t // bt, d // bd),
               jax.ShapeDtypeStruct((t, d), jnp.float32), idx_TM.T, c_TM.T, table_ND,
               bytes_accessed=t * m * d * table_ND.dtype.itemsize + t * d * 4,
               flops=2 * t * m * d)


def _table_grads(opts, idx_TM, a_TM, b_TM, x_TD, dy_TD, n, du_dtype, dv_dtype):
  """du, dv (N, D): sorted segment sums of a·x[tok] and b·dy[tok] per expert id."""
  br, bd, chunk = opts[3], opts[4], opts[5]
  t, m = idx_TM.shape
  d = x_TD.shape[1]
  n_pad = _round_up(n, br)
  ids = idx_TM.reshape(-1)
  order = jnp.argsort(ids, stable=True).astype(jnp.int32)
  sid = ids[order]
  off = jnp.searchsorted(sid, jnp.arange(0, n_pad + 1, br, dtype=jnp.int32),
                         side="left").astype(jnp.int32)
  # `chunk` entries of padding so that a chunk's loads never leave the arrays.
  pad = lambda a, value=0: jnp.pad(a, (0, chunk), constant_values=value)
  pairs = t * m
  du, dv = _call(
      opts, functools.partial(_segment_kernel, br, chunk, bd), (n_pad // br, d // bd),
      [jax.ShapeDtypeStruct((n_pad, d), du_dtype), jax.ShapeDtypeStruct((n_pad, d), dv_dtype)],
      off, pad(sid, -1), pad(order // m), pad(a_TM.reshape(-1)[order]),
      pad(b_TM.reshape(-1)[order]), x_TD, dy_TD,
      bytes_accessed=pairs * d * 8 + n_pad * d * (jnp.dtype(du_dtype).itemsize
                                                  + jnp.dtype(dv_dtype).itemsize),
      flops=4 * pairs * br * d)
  if n_pad != n:
    du, dv = du[:n], dv[:n]
  return du, dv


def _fwd_epilogue(activation, w, pre):
  return (w * activation(pre),)


def _bwd_epilogue(activation, w, pre, dcoef):
  h, dh = jax.jvp(activation, (pre,), (jnp.ones_like(pre),))
  return dcoef * h, dh * w * dcoef, w * h   # dw, a (for du, dx), b (for dv)


def _padded(opts, x_TD, idx_TM, w_TM):
  """Tokens zero-padded so T is a multiple of the token block and T·M of the pair block."""
  bt, bp = opts[1], opts[2]
  t, m = idx_TM.shape
  t_pad = _round_up(t, max(bt, bp // math.gcd(bp, m)))
  return (_pad_rows(x_TD.astype(jnp.float32), t_pad), _pad_rows(idx_TM, t_pad),
          _pad_rows(w_TM.astype(jnp.float32), t_pad))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _peer_gpu(opts, x_TD, idx_TM, w_TM, u_ND, v_ND):
  return _forward(opts, x_TD, idx_TM, w_TM, u_ND, v_ND)


def _forward(opts, x_TD, idx_TM, w_TM, u_ND, v_ND):
  t = x_TD.shape[0]
  x, idx, w = _padded(opts, x_TD, idx_TM, w_TM)
  (c,) = _pair_call(opts, functools.partial(_fwd_epilogue, opts[0]), 1, idx.reshape(-1),
                    w.reshape(-1), [(x, u_ND)])
  y = _rows_call(opts, idx, c.reshape(idx.shape), v_ND)
  return y[:t].astype(jnp.result_type(x_TD, w_TM, u_ND, v_ND))


def _fwd(opts, x_TD, idx_TM, w_TM, u_ND, v_ND):
  return _forward(opts, x_TD, idx_TM, w_TM, u_ND, v_ND), (x_TD, idx_TM, w_TM, u_ND, v_ND)


def _bwd(opts, res, dy_TD):
  x_TD, idx_TM, w_TM, u_ND, v_ND = res
  t, m = idx_TM.shape
  x, idx, w = _padded(opts, x_TD, idx_TM, w_TM)
  dy = _pad_rows(dy_TD.astype(jnp.float32), x.shape[0])
  dw, a, b = _pair_call(opts, functools.partial(_bwd_epilogue, opts[0]), 3, idx.reshape(-1),
                        w.reshape(-1), [(x, u_ND), (dy, v_ND)])
  a = a.reshape(idx.shape)
  dx = _rows_call(opts, idx, a, u_ND)
  du, dv = _table_grads(opts, idx_TM, a[:t], b.reshape(idx.shape)[:t], x, dy, u_ND.shape[0],
                        u_ND.dtype, v_ND.dtype)
  return (dx[:t].astype(x_TD.dtype), None, dw.reshape(idx.shape)[:t].astype(w_TM.dtype), du, dv)


_peer_gpu.defvjp(_fwd, _bwd)


def peer_experts_pallas_gpu(x, indices, weights, u, v, activation=jax.nn.gelu, *,
                            interpret=None, block_tokens=DEFAULT_BLOCK_TOKENS,
                            block_pairs=DEFAULT_BLOCK_PAIRS, block_rows=DEFAULT_BLOCK_ROWS,
                            block_d=DEFAULT_BLOCK_D, chunk_pairs=DEFAULT_CHUNK_PAIRS,
                            num_warps=DEFAULT_NUM_WARPS):
  """PEER expert mixture as Pallas GPU (Triton) kernels; same semantics as `peer_experts`.

  Args:
    x: (T, D) tokens.
    indices: (T, H, K) integer expert ids in [0, N), not range-checked (an out-of-range
      id makes the kernels load outside the table).
    weights: (T, H, K) router weights.
    u, v: (N, D) expert tables (f32 or bf16; all arithmetic is f32). Table gradients come
      back in the tables' dtypes, summed in f32.
    activation: elementwise function, static (traced into the kernels and differentiated
      there with jax.jvp).
    interpret: None = Pallas interpret mode on CPU, compiled (Triton) elsewhere.
    block_tokens, block_pairs, block_rows, block_d, chunk_pairs: tile sizes (powers of 2;
      block_rows and chunk_pairs >= 16 when compiled, for the one-hot tl.dot). See the
      module docstring for which kernel uses which.
    num_warps: Triton warps per program.
  """
  t, d = x.shape
  check_expert_args(x, indices, weights, u, v)
  blocks = (block_tokens, block_pairs, block_rows, block_d, chunk_pairs)
  if not all(_pow2(b) for b in blocks):
    raise ValueError(f"block sizes must be powers of 2, got {blocks}")
  interpret = _interpret(interpret)
  if not interpret and (d % 16 or block_rows < 16 or chunk_pairs < 16):
    raise ValueError(f"compiled Triton kernels need D % 16 == 0 and block_rows, chunk_pairs "
                     f">= 16, got D={d}, block_rows={block_rows}, chunk_pairs={chunk_pairs}")
  m = indices[0].size
  bt = min(block_tokens, 1 << max(0, (t - 1).bit_length()))  # no more than T rounded up
  opts = (activation, bt, block_pairs, block_rows, _col_block(d, block_d), chunk_pairs,
          num_warps, interpret)
  return _peer_gpu(opts, x, indices.reshape(t, m).astype(jnp.int32), weights.reshape(t, m),
                   u, v)


# ------------------------------------------------------ building blocks (sharded bank)
# The three kernels one at a time, for `sharded_peer_experts` (ops/sharded_experts.py),
# which needs a psum over the model axes between the pair dots and the weighted sum.
# Not differentiable themselves (the bank has its own VJP). Defaults as above.


def _block_opts(t, d, m, interpret):
  bt = min(DEFAULT_BLOCK_TOKENS, 1 << max(0, (t - 1).bit_length()))
  return (None, bt, DEFAULT_BLOCK_PAIRS, DEFAULT_BLOCK_ROWS, _col_block(d, DEFAULT_BLOCK_D),
          DEFAULT_CHUNK_PAIRS, DEFAULT_NUM_WARPS, bool(interpret))


def _pad_tokens(opts, t, m):
  bt, bp = opts[1], opts[2]
  return _round_up(t, max(bt, bp // math.gcd(bp, m)))


def pair_dots(table_ND, idx_TM, src_TD, *, interpret=False):
  """(T, M) f32: src[t] · table[idx[t, m]] (Triton pair kernel, identity epilogue)."""
  t, m = idx_TM.shape
  opts = _block_opts(t, src_TD.shape[1], m, interpret)
  t_pad = _pad_tokens(opts, t, m)
  idx = _pad_rows(idx_TM, t_pad)
  (pre,) = _pair_call(opts, lambda w, pre: (pre,), 1, idx.reshape(-1),
                      jnp.zeros((t_pad * m,), jnp.float32),
                      [(_pad_rows(src_TD.astype(jnp.float32), t_pad), table_ND)])
  return pre.reshape(t_pad, m)[:t]


def weighted_rows(table_ND, idx_TM, coef_TM, *, interpret=False):
  """(T, D) f32: Σ_m coef[t, m] · table[idx[t, m]] (Triton rows kernel)."""
  t, m = idx_TM.shape
  opts = _block_opts(t, table_ND.shape[1], m, interpret)
  t_pad = _pad_tokens(opts, t, m)
  return _rows_call(opts, _pad_rows(idx_TM, t_pad),
                    _pad_rows(coef_TM.astype(jnp.float32), t_pad), table_ND)[:t]


def table_grads(idx_TM, a_TM, x_TD, b_TM, dy_TD, n, du_dtype, dv_dtype, *, interpret=False):
  """du, dv (N, D): Σ a·x[tok] and Σ b·dy[tok] per expert id (Triton segment-sum kernel)."""
  t, m = idx_TM.shape
  opts = _block_opts(t, x_TD.shape[1], m, interpret)
  return _table_grads(opts, idx_TM, a_TM.astype(jnp.float32), b_TM.astype(jnp.float32),
                      x_TD.astype(jnp.float32), dy_TD.astype(jnp.float32), n, du_dtype,
                      dv_dtype)
