"""PKM: product-key memory (Lample et al. 2019), the paper's second baseline.

    y_BTD, aux = PKM(...)(x_BTD, train=bool)

Same retrieval as PEER (`ProductKeyRetrieval`: query network, query norm, product keys,
softmax router) but with per-head sub-keys as in Lample et al., and the retrieved items
are value vectors, not neurons: y = Σ_heads Σ_k w · values[idx] (an EmbeddingBag with
per-sample weights), optionally followed by a value_dim -> D projection.

The weighted gather-sum is the op `peer_jax.ops.embedding_bag.embedding_bag`, chunked
over tokens with a hand-written VJP like `peer_experts`.

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

import math

import jax
import jax.numpy as jnp
from flax import nnx

from peer_jax.layers.common import fan_in_normal, param
from peer_jax.layers.peer import ProductKeyRetrieval, table_init_std
# The bag op lives in ops/; its names stay importable from here for callers.
from peer_jax.ops.embedding_bag import (embedding_bag, embedding_bag_cpu,  # noqa: F401
                                        embedding_bag_reference, resolve_bag_kernel)


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
