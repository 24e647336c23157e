"""The PEER expert bank sharded along D: no device ever holds or gathers a whole table.

Same maths as `peer_experts` / `peer_experts_glu` (peer_jax/ops/experts.py):

    y[t] = Σ_m w[t,m] · σ(u[i]·x[t]) · v[i],     i = indices[t,m],  m over heads × top_k

but the (N, D) tables u, v (and g) are split along D over the `model_axes` of the mesh
(normally `tensor`, from the `expert_embed` rule), each device holding all N rows of a
D/t slice. Written with `shard_map` so that the communication is exactly:

* forward: the (tokens, h, k) indices and router weights are replicated over the model
  axes (all-gathered if the retrieval left them sharded: tokens·h·k integers); each
  device computes its partial u[i]·x[t] over its D-slice; ONE psum over the model axes of
  those tokens·h·k scalars (two with GLU); the activation; each device forms the weighted
  sum of its D-slice of the retrieved v rows. The output stays split along D
  (out spec (tokens, model_axes)); the caller's sharding constraint reassembles it.
* backward (hand-written VJP, outside the shard_map so no AD runs through collectives):
  one psum over the model axes of the tokens·h·k scalars dy·v[i]; every other gradient is
  local: dx on the device's D-slice, the table gradients scatter-added into the device's
  (N, D/t) slice. The table gradients are then summed over the token (data-parallel)
  axes: the usual data-parallel gradient all-reduce, on slices, never a gather.

Every device does the same work whatever the routing (each handles every retrieved row,
on its D-slice), so there is no load imbalance, unlike sharding along N.

Tokens are split over `token_axes` (the batch axes that are not model axes); work is
chunked over a device's tokens as in the single-device kernel.
"""

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, PartitionSpec as P

from peer_jax.ops.chunking import (acc_dtype, check_routing, clamp_chunk, flat_routing,
                                   from_chunks, hidden, map_chunks, to_chunks)
from peer_jax.ops.experts import DEFAULT_CHUNK_SIZE


PRE_NAME = "expert_pre"  # checkpoint name of the bank's (T, M) pre-activations


def _psum(x, axes):
  return lax.psum(x, axes) if axes else x


def _pre_partial(x_TD, idx_TM, ins, chunk_size, acc):
  """Partial pre-activations over this device's D-slice: one (T, M) per input table."""

  def body(c):
    x_CD, idx_CM = c
    x_CD = x_CD.astype(acc)
    return tuple(jnp.einsum("cd,cmd->cm", x_CD, jnp.take(t, idx_CM, axis=0).astype(acc),
                            preferred_element_type=acc) for t in ins)

  return map_chunks(body, (x_TD, idx_TM), chunk_size)


def _weighted_rows(coef_TM, idx_TM, table_ND, chunk_size, acc):
  """Σ_m coef[t,m] · table[idx[t,m]] on this device's D-slice: (T, D/t)."""

  def body(c):
    coef_CM, idx_CM = c
    rows = jnp.take(table_ND, idx_CM, axis=0).astype(acc)
    return jnp.einsum("cm,cmd->cd", coef_CM, rows, preferred_element_type=acc)

  return map_chunks(body, (coef_TM, idx_TM), chunk_size)


def _row_dots(dy_TD, idx_TM, table_ND, chunk_size, acc):
  """dy[t] · table[idx[t,m]] on this device's D-slice: (T, M)."""

  def body(c):
    dy_CD, idx_CM = c
    rows = jnp.take(table_ND, idx_CM, axis=0).astype(acc)
    return jnp.einsum("cd,cmd->cm", dy_CD.astype(acc), rows, preferred_element_type=acc)

  return map_chunks(body, (dy_TD, idx_TM), chunk_size)


class _Prims:
  """The per-shard building blocks of one non-XLA implementation (see `_prims`)."""

  def __init__(self, impl: str, interpret: bool):
    self.impl, self.interpret = impl, interpret

  def dots(self, table_ND, idx_TM, src_TD, cs):
    """(T, M) f32: src[t] · table[idx[t, m]] on this shard's D-slice."""
    if self.impl == "cpu_ffi":
      from peer_jax.ops.cpu_experts import gather_dot
      return gather_dot(table_ND, idx_TM, src_TD.astype(jnp.float32))
    if self.impl == "pallas_gpu":
      from peer_jax.ops.pallas_experts_gpu import pair_dots
      return pair_dots(table_ND, idx_TM, src_TD, interpret=self.interpret)
    from peer_jax.ops.pallas_rows import pair_dots   # pallas_tpu: row DMAs, no tile gathers
    return pair_dots(table_ND, idx_TM, src_TD, interpret=self.interpret)

  def rows(self, table_ND, idx_TM, coef_TM, cs):
    """(T, D/t) f32: Σ_m coef[t, m] · table[idx[t, m]]."""
    if self.impl == "cpu_ffi":
      from peer_jax.ops.cpu_experts import gather_wsum
      return gather_wsum(table_ND, idx_TM, coef_TM.astype(jnp.float32))
    if self.impl == "pallas_gpu":
      from peer_jax.ops.pallas_experts_gpu import weighted_rows
      return weighted_rows(table_ND, idx_TM, coef_TM, interpret=self.interpret)
    from peer_jax.ops.pallas_rows import weighted_rows
    return weighted_rows(table_ND, idx_TM, coef_TM, interpret=self.interpret)

  def table_grads(self, idx_TM, pairs, n, dtypes):
    """Per (a_TM, src_TD) in `pairs`: the (N, D/t) f32 sum of a·src[tok] per expert id."""
    if self.impl == "cpu_ffi":
      from peer_jax.ops.cpu_experts import scatter_outer
      return [scatter_outer(n, idx_TM, a.astype(jnp.float32), src.astype(jnp.float32))
              for a, src in pairs]
    if self.impl == "pallas_gpu":
      from peer_jax.ops.pallas_experts_gpu import table_grads
    else:
      from peer_jax.ops.pallas_experts import table_grads
    (a, x), (b, dy) = pairs   # Pallas: no GLU, so exactly (u, v)
    return list(table_grads(idx_TM, a, x, b, dy, n, dtypes[0], dtypes[1],
                            interpret=self.interpret))


def _bank(fwd_body, bwd_body, mesh, token_axes, model_axes, num_ins):
  """The custom-VJP bank around per-shard bodies (the XLA and the `_Prims` builds alike).

  fwd_body(x_TD, idx_TM, w_TM, *tables) -> (y_TD, *pre_TM) and
  bwd_body(x_TD, idx_TM, w_TM, dy_TD, *pre_TM, *tables) -> (dx_TD, dw_TM, *dtables) run
  under `shard_map`: tokens over `token_axes`, D over `model_axes`, the (T, M) arrays
  replicated over the model axes, every table all rows of a D-slice. The VJP sits outside
  the shard_map, so no AD runs through the collectives; residuals are the inputs and the
  (T, M) pre-activations.
  """
  tok = token_axes or None
  mod = model_axes or None
  x_spec = P(tok, mod)       # (T, D): tokens over token axes, features over model axes
  tm_spec = P(tok, None)     # (T, M): replicated over model axes
  table_spec = P(None, mod)  # (N, D): all rows, a D-slice
  smap = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)
  fwd_map = smap(fwd_body, in_specs=(x_spec, tm_spec, tm_spec) + (table_spec,) * (num_ins + 1),
                 out_specs=(x_spec,) + (tm_spec,) * num_ins)
  bwd_map = smap(bwd_body,
                 in_specs=(x_spec, tm_spec, tm_spec, x_spec) + (tm_spec,) * num_ins
                 + (table_spec,) * (num_ins + 1),
                 out_specs=(x_spec, tm_spec) + (table_spec,) * (num_ins + 1))

  @jax.custom_vjp
  def bank(x_TD, idx_TM, w_TM, *tables):
    return fwd_map(x_TD, idx_TM, w_TM, *tables)[0]

  def bank_fwd(x_TD, idx_TM, w_TM, *tables):
    y_TD, *pre = fwd_map(x_TD, idx_TM, w_TM, *tables)
    # Kept under remat (peer_jax.model.REMAT_SAVED): the backward then does not re-gather
    # the u rows to recompute them.
    pre = [checkpoint_name(p, PRE_NAME) for p in pre]
    return y_TD, (x_TD, idx_TM, w_TM, tuple(pre), tables)

  def bank_bwd(res, dy_TD):
    x_TD, idx_TM, w_TM, pre, tables = res
    dx_TD, dw_TM, *dtables = bwd_map(x_TD, idx_TM, w_TM, dy_TD.astype(x_TD.dtype), *pre,
                                     *tables)
    return (dx_TD, None, dw_TM, *dtables)

  bank.defvjp(bank_fwd, bank_bwd)
  return bank


def _build(activation: Callable, chunk_size: int, mesh: Mesh, token_axes: tuple[str, ...],
           model_axes: tuple[str, ...], num_ins: int, impl: str = "xla",
           interpret: bool = False):
  """The custom-VJP function for one static setting (mesh, axes, activation, chunking,
  implementation of the per-shard gathers / sums: see `sharded_peer_experts`)."""
  if impl == "pallas_tpu" and not model_axes:
    # D is not split: each shard runs the whole fused Mosaic kernel on its tokens.
    return _build_local(activation, mesh, token_axes, impl, interpret)
  if impl != "xla":
    return _build_prims(activation, chunk_size, mesh, token_axes, model_axes, num_ins,
                        _Prims(impl, interpret))
  def fwd_body(x_TD, idx_TM, w_TM, *tables):
    ins, v_ND = tables[:-1], tables[-1]
    acc = acc_dtype(x_TD, w_TM, v_ND, *ins)
    cs = clamp_chunk(chunk_size, x_TD.shape[0])
    # The one all-reduce of the forward: tokens·M partial dot products per input table.
    pre = _psum(_pre_partial(x_TD, idx_TM, ins, cs, acc), model_axes)
    coef_TM = w_TM.astype(acc) * hidden(activation, pre)
    y_TD = _weighted_rows(coef_TM, idx_TM, v_ND, cs, acc)
    out_dtype = jnp.result_type(x_TD, w_TM, v_ND, *ins)
    return (y_TD.astype(out_dtype),) + tuple(pre)

  def bwd_body(x_TD, idx_TM, w_TM, dy_TD, *rest):
    pre = rest[:num_ins]
    tables = rest[num_ins:]
    ins, v_ND = tables[:-1], tables[-1]
    acc = acc_dtype(x_TD, w_TM, v_ND, *ins)
    cs = clamp_chunk(chunk_size, x_TD.shape[0])
    w32 = w_TM.astype(acc)
    h_TM, h_vjp = jax.vjp(lambda *p: hidden(activation, p), *pre)
    # The one all-reduce of the backward: dy · v[i], tokens·M scalars.
    dcoef_TM = _psum(_row_dots(dy_TD, idx_TM, v_ND, cs, acc), model_axes)
    dw_TM = dcoef_TM * h_TM
    dpre = h_vjp(dcoef_TM * w32)
    coef_TM = w32 * h_TM

    def chunk(carry, c):
      dins, dv = carry
      x_CD, idx_CM, dy_CD, coef_CM, *dpre_C = c
      x_CD, dy_CD = x_CD.astype(acc), dy_CD.astype(acc)
      dx_CD = sum(jnp.einsum("cm,cmd->cd", dp, jnp.take(t, idx_CM, axis=0).astype(acc),
                             preferred_element_type=acc) for dp, t in zip(dpre_C, ins))
      flat = idx_CM.reshape(-1)
      d = x_CD.shape[-1]
      dins = tuple(dt.at[flat].add((dp[:, :, None] * x_CD[:, None, :]).reshape(-1, d))
                   for dt, dp in zip(dins, dpre_C))
      dv = dv.at[flat].add((coef_CM[:, :, None] * dy_CD[:, None, :]).reshape(-1, d))
      return (dins, dv), dx_CD

    init = (tuple(jnp.zeros(t.shape, acc) for t in ins), jnp.zeros(v_ND.shape, acc))
    chunks = tuple(to_chunks(a, cs) for a in (x_TD, idx_TM, dy_TD, coef_TM, *dpre))
    (dins, dv_ND), dx = lax.scan(chunk, init, chunks)
    dx_TD = from_chunks(dx, x_TD.shape[0]).astype(x_TD.dtype)
    # Data-parallel sum of the table gradients: slices (N, D/t), summed over token axes.
    dins = tuple(_psum(d, token_axes).astype(t.dtype) for d, t in zip(dins, ins))
    dv_ND = _psum(dv_ND, token_axes).astype(v_ND.dtype)
    return (dx_TD, dw_TM.astype(w_TM.dtype)) + dins + (dv_ND,)

  return _bank(fwd_body, bwd_body, mesh, token_axes, model_axes, num_ins)


def _build_local(activation, mesh, token_axes, impl, interpret):
  """No model axes: the single-device kernel on each shard's tokens (all rows, all of D),
  its own VJP inside the shard_map, then the data-parallel psum of the table gradients."""
  from peer_jax.ops.pallas_experts import peer_experts_pallas
  tok = token_axes or None
  x_spec, tm_spec, table_spec = P(tok, None), P(tok, None), P(None, None)
  smap = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)

  def op(x_TD, idx_TM, w_TM, u_ND, v_ND):
    return peer_experts_pallas(x_TD, idx_TM[:, None, :], w_TM[:, None, :], u_ND, v_ND,
                               activation, interpret=interpret)

  fwd_map = smap(op, in_specs=(x_spec, tm_spec, tm_spec, table_spec, table_spec),
                 out_specs=x_spec)

  def bwd_body(x_TD, idx_TM, w_TM, u_ND, v_ND, dy_TD):
    _, vjp = jax.vjp(lambda x, w, u, v: op(x, idx_TM, w, u, v), x_TD, w_TM, u_ND, v_ND)
    dx, dw, du, dv = vjp(dy_TD)
    psum = lambda d: _psum(d.astype(jnp.float32), token_axes).astype(d.dtype)
    return dx, dw, psum(du), psum(dv)

  bwd_map = smap(bwd_body, in_specs=(x_spec, tm_spec, tm_spec, table_spec, table_spec, x_spec),
                 out_specs=(x_spec, tm_spec, table_spec, table_spec))

  @jax.custom_vjp
  def bank(x_TD, idx_TM, w_TM, u_ND, v_ND):
    return fwd_map(x_TD, idx_TM, w_TM, u_ND, v_ND)

  def bank_fwd(x_TD, idx_TM, w_TM, u_ND, v_ND):
    return fwd_map(x_TD, idx_TM, w_TM, u_ND, v_ND), (x_TD, idx_TM, w_TM, u_ND, v_ND)

  def bank_bwd(res, dy_TD):
    x_TD, idx_TM, w_TM, u_ND, v_ND = res
    dx, dw, du, dv = bwd_map(x_TD, idx_TM, w_TM, u_ND, v_ND, dy_TD.astype(x_TD.dtype))
    return dx, None, dw, du, dv

  bank.defvjp(bank_fwd, bank_bwd)
  return bank


def _build_prims(activation, chunk_size, mesh, token_axes, model_axes, num_ins, prims):
  """Like `_build`'s XLA version, with the gathers and sums of `prims` on each shard.

  Same communication: one psum of tokens·M scalars per input table forward, one backward,
  and the data-parallel psum of the table-gradient slices.
  """
  def fwd_body(x_TD, idx_TM, w_TM, *tables):
    ins, v_ND = tables[:-1], tables[-1]
    cs = clamp_chunk(chunk_size, x_TD.shape[0])
    pre = tuple(_psum(prims.dots(t, idx_TM, x_TD, cs), model_axes) for t in ins)
    coef_TM = w_TM.astype(jnp.float32) * hidden(activation, pre)
    y_TD = prims.rows(v_ND, idx_TM, coef_TM, cs)
    return (y_TD.astype(jnp.result_type(x_TD, w_TM, v_ND, *ins)),) + pre

  def bwd_body(x_TD, idx_TM, w_TM, dy_TD, *rest):
    pre, tables = rest[:num_ins], rest[num_ins:]
    ins, v_ND = tables[:-1], tables[-1]
    cs = clamp_chunk(chunk_size, x_TD.shape[0])
    w32 = w_TM.astype(jnp.float32)
    h_TM, h_vjp = jax.vjp(lambda *p: hidden(activation, p), *pre)
    dcoef_TM = _psum(prims.dots(v_ND, idx_TM, dy_TD, cs), model_axes)
    dw_TM = dcoef_TM * h_TM
    dpre = h_vjp(dcoef_TM * w32)
    dx_TD = sum(prims.rows(t, idx_TM, dp, cs) for t, dp in zip(ins, dpre))
    pairs = [(dp, x_TD) for dp in dpre] + [(w32 * h_TM, dy_TD)]
    grads = prims.table_grads(idx_TM, pairs, v_ND.shape[0], [t.dtype for t in tables])
    dtables = tuple(_psum(d.astype(jnp.float32), token_axes).astype(t.dtype)
                    for d, t in zip(grads, tables))
    return (dx_TD.astype(x_TD.dtype), dw_TM.astype(w_TM.dtype)) + dtables

  return _bank(fwd_body, bwd_body, mesh, token_axes, model_axes, num_ins)


@functools.lru_cache(maxsize=64)
def _cached_build(activation, chunk_size, mesh, token_axes, model_axes, num_ins, impl="xla",
                  interpret=False):
  return _build(activation, chunk_size, mesh, token_axes, model_axes, num_ins, impl, interpret)


def _axes_size(mesh: Mesh, axes: Sequence[str]) -> int:
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
  return int(np.prod([sizes[a] for a in axes])) if axes else 1


def sharded_peer_experts(x, indices, weights, u, v, activation=jax.nn.gelu, *, mesh: Mesh,
                         model_axes: Sequence[str] = ("tensor",),
                         token_axes: Sequence[str] = ("data", "fsdp"),
                         g=None, chunk_size: int = DEFAULT_CHUNK_SIZE, impl: str = "xla",
                         interpret: bool = False):
  """PEER expert mixture with the tables split along D over `model_axes` of `mesh`.

  Args:
    x: (T, D) tokens (a global array; T split over `token_axes`).
    indices, weights: (T, H, K) expert ids and router weights.
    u, v: (N, D) tables (g too for the GLU variant: activation(g·x) · (u·x) · v).
    activation: elementwise function (static).
    mesh: the device mesh; model_axes split D, token_axes split T (an axis may not be in
      both; axes of size 1 may be listed and cost nothing).
    chunk_size: tokens per chunk on each device (static).
    impl: the per-shard implementation, resolved by `peer_jax.ops.kernels.resolve_kernel`:
      "xla" (chunked gathers and scatter-adds), "cpu_ffi" (the fused FFI kernels on each
      shard's slice), "pallas_gpu" (the three Triton kernels one by one), "pallas_tpu"
      (with model axes: the Mosaic row kernels of ops/pallas_rows.py for the gathers and
      the TPU row-backward kernel for the table gradients; without: the whole fused
      Mosaic kernel per shard). Pallas: no GLU.
    interpret: run a Pallas impl in interpret mode (tests on CPU).

  Returns:
    y: (T, D), equal to `peer_experts(x, indices, weights, u, v, activation)`.
  """
  model_axes = tuple(model_axes)
  token_axes = tuple(a for a in token_axes if a not in model_axes)
  num_tokens, d = x.shape
  check_routing(num_tokens, indices, weights)
  t_size, m_size = _axes_size(mesh, token_axes), _axes_size(mesh, model_axes)
  if d % m_size:
    raise ValueError(f"sharded expert bank: d_model {d} is not divisible by the model axes "
                     f"{model_axes} (size {m_size})")
  if num_tokens % t_size:
    raise ValueError(f"sharded expert bank: {num_tokens} tokens are not divisible by the "
                     f"token axes {token_axes} (size {t_size})")
  idx_TM, w_TM = flat_routing(indices, weights)
  ins = (u,) if g is None else (u, g)
  if impl.startswith("pallas") and g is not None:
    raise ValueError(f"sharded expert bank: {impl} has no GLU variant")
  bank = _cached_build(activation, int(chunk_size), mesh, token_axes, model_axes, len(ins),
                       impl, bool(interpret))
  return bank(x, idx_TM, w_TM, *ins, v)
