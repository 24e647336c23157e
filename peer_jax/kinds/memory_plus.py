"""Memory+ (Berges et al. 2024, "Memory Layers at Scale", arXiv 2412.09764): the layer and
its kind declaration, in this one file.

    y_BTD, aux = MemoryPlus(...)(x_BTD, train=bool)

A product-key memory whose output is gated:

    idx, w = top-k product-key retrieval of q(x)   (per head; w = softmax over the k scores)
    y      = Σ_heads Σ_k w · values[idx]           (the PKM embedding bag)
    out    = W_out (y ⊙ silu(W_gate x))

* Retrieval: `ProductKeyRetrieval` of layers/peer.py with per-head sub-keys and the paper's
  qk-norm: the query is RMS-normalised per head (learned scale, `query_norm='rmsnorm'`)
  and every sub-key is RMS-normalised (`key_norm=True`), so the scores' scale is set by
  the norms' parameters, not by drifting key or query norms.
* Values: one (N, D) table `values_NV` ('experts', 'expert_embed'), looked up by PKM's
  `embedding_bag` (and its CPU FFI kernel, `model.memory_plus.kernel`, as `model.pkm.kernel`).
* `shared_values=True`: every block in `model.ffw_layers` reads one value pool (the
  paper's shared memory). The blocks hold the *same* `ValuePool` module, so nnx keeps one
  parameter (at the first block's path), its gradient sums the contributions of all
  blocks, and it is one table for the table optimizer and for checkpoints.
  Queries, keys and the gate/output projections stay per block.
* Causal at every position and in training too (a per-token layer; no batch statistics).

Init: values std √(top_k/heads), so y has about unit variance per feature at init (softmax
weights ≈ 1/k); W_gate std 1/√D; W_out std out_scale/√D. The output RMS at init is then
≈ √E[silu(z)²] ≈ 0.6 (z ~ N(0, 1)) times the block's out_scale, close to the dense FFW's
≈ 0.65 (GELU).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from peer_jax.kinds.base import FFWKind
from peer_jax.kinds.retrieval_cost import retrieval_flop_terms, retrieval_params
from peer_jax.layers.common import fan_in_normal, param
from peer_jax.layers.peer import ProductKeyRetrieval
from peer_jax.layers.pkm import embedding_bag, embedding_bag_cpu, resolve_bag_kernel

NAME = "memory_plus"
KEY = f"model.{NAME}"
SHARED_POOL = f"{NAME}.values"  # its key in the model's `shared` dict


def default_config() -> dict:
  """The `model.memory_plus` section (configs/memory_plus.py adds it to a config)."""
  return {
      "num_memories": 1024**2,  # N value vectors; a perfect square (product keys)
      "heads": 4,               # retrieval heads (each with its own sub-keys)
      "top_k": 32,              # values per head; at most √N
      "key_dim": 256,           # query / key dimension per head; even
      "shared_values": False,   # one value pool for all blocks in model.ffw_layers
      "chunk_size": 512,        # tokens per chunk of the embedding bag and the retrieval
      "kernel": "auto",         # the embedding bag's: auto | xla | cpu_ffi (as model.pkm.kernel)
  }


class ValuePool(nnx.Module):
  """The (N, D) value table; one per block, or one object shared by all blocks."""

  def __init__(self, num_memories: int, dim: int, *, std: float, rngs: nnx.Rngs):
    self.values_NV = param(rngs, nnx.initializers.normal(stddev=std), (num_memories, dim),
                           ("experts", "expert_embed"))


class MemoryPlus(nnx.Module):
  """Gated product-key memory: W_out (Σ w·values[idx] ⊙ silu(W_gate x)).

  `pool`: a ValuePool to read (shared between blocks), or None to make this layer's own.
  """

  def __init__(self, d_model: int, *, num_memories: int, heads: int, top_k: int, key_dim: int,
               pool: ValuePool | None = None, chunk_size: int = 512, out_scale: float = 1.0,
               kernel: str = "auto", rngs: nnx.Rngs, dtype=jnp.float32):
    from peer_jax.ops.kernels import KERNELS
    if kernel not in KERNELS:
      raise ValueError(f"{KEY}.kernel: unknown value {kernel!r}; expected one of {KERNELS}")
    self.kernel, self.chunk_size, self.dtype = kernel, chunk_size, dtype
    self.retrieval = ProductKeyRetrieval(
        d_model, num_keys=num_memories, heads=heads, top_k=top_k, key_dim=key_dim,
        query_norm="rmsnorm", per_head_keys=True, router="softmax", key_norm=True,
        chunk_tokens=chunk_size, rngs=rngs, dtype=dtype)
    self.pool = pool if pool is not None else make_pool(d_model, num_memories, heads, top_k,
                                                        rngs=rngs)
    self.w_gate_DD = param(rngs, fan_in_normal(d_model), (d_model, d_model), ("embed", "mlp"))
    self.w_out_DD = param(rngs, fan_in_normal(d_model, out_scale), (d_model, d_model),
                          ("mlp", "embed"))

  def lookup(self, idx_TM, w_TM):
    """y_TV = Σ_m w[t, m] · values[idx[t, m]] (the kernel chosen like PKM's)."""
    from peer_jax import sharding
    from peer_jax.ops import kernels
    ctx = sharding.current_rules()
    table = self.pool.values_NV[...]
    impl, why = resolve_bag_kernel(self.kernel, table_dtype=table.dtype,
                                   num_devices=ctx.mesh.size if ctx is not None else 1)
    kernels.log_choice(impl, why, self.kernel, what="Memory+ embedding bag")
    bag = lambda tab, i, w: embedding_bag(tab, i, w, chunk_size=self.chunk_size)
    if impl == "cpu_ffi" and self.kernel == "auto":  # as PKM: XLA if traced elsewhere
      return jax.lax.platform_dependent(table, idx_TM, w_TM, cpu=embedding_bag_cpu, default=bag)
    if impl == "cpu_ffi":
      return embedding_bag_cpu(table, idx_TM, w_TM)
    return bag(table, idx_TM, w_TM)

  def __call__(self, x_BTD, *, train: bool = False, segment_ids_BT=None, decode: bool = False):
    del segment_ids_BT, decode
    B, T, D = x_BTD.shape
    x_BTD = x_BTD.astype(self.dtype)
    _, idx_BTHK, w_BTHK = self.retrieval(x_BTD, train=train)
    y_TV = self.lookup(idx_BTHK.reshape(B * T, -1), w_BTHK.reshape(B * T, -1))
    y_BTD = y_TV.reshape(B, T, -1).astype(self.dtype)
    gate_BTD = jax.nn.silu(x_BTD @ self.w_gate_DD[...].astype(self.dtype))
    out_BTD = (y_BTD * gate_BTD) @ self.w_out_DD[...].astype(self.dtype)
    return out_BTD, {"expert_indices": idx_BTHK, "expert_weights": w_BTHK}


def make_pool(d_model: int, num_memories: int, heads: int, top_k: int, *, rngs) -> ValuePool:
  return ValuePool(num_memories, d_model, std=math.sqrt(top_k / heads), rngs=rngs)


# ----------------------------------------------------------------------------- the kind


def section(m):
  """model.memory_plus with the defaults above for missing keys (or a missing section)."""
  import ml_collections
  merged = ml_collections.ConfigDict(default_config())
  if NAME in m:
    merged.update(dict(m[NAME]))
  return merged


def build(m, *, rngs, dtype, out_scale, shared):
  s = section(m)
  pool = None
  if s.shared_values:
    if SHARED_POOL not in shared:
      shared[SHARED_POOL] = make_pool(m.d_model, s.num_memories, s.heads, s.top_k, rngs=rngs)
    pool = shared[SHARED_POOL]
  return MemoryPlus(m.d_model, num_memories=s.num_memories, heads=s.heads, top_k=s.top_k,
                    key_dim=s.key_dim, pool=pool, chunk_size=s.chunk_size,
                    out_scale=out_scale, kernel=s.kernel, rngs=rngs, dtype=dtype)


def _checked(cfg):
  """A {'model': {'memory_plus': ...}} view with the defaults filled in, for the checks."""
  import ml_collections
  return ml_collections.ConfigDict({"model": {NAME: section(cfg.model).to_dict()}})


def validate(cfg, checks):
  c = _checked(cfg)
  checks.product_keys(c, KEY, "num_memories", "key_dim")
  if not isinstance(checks.get(c, f"{KEY}.shared_values"), bool):
    checks.fail(f"{KEY}.shared_values", f"must be True or False, got {c.model[NAME].shared_values!r}")
  checks.positive_int(c, f"{KEY}.chunk_size")
  checks.kernel(c, f"{KEY}.kernel")


def validate_kernel(cfg, *, sizes, rules, num_devices, platform):
  from peer_jax.kinds.pkm import validate_bag_kernel
  validate_bag_kernel(section(cfg.model).kernel, f"{KEY}.kernel", num_devices=num_devices,
                      platform=platform)


def flop_terms(m, n_exp: int, seq_len: int) -> dict:
  if not n_exp:
    return {}
  s, d = section(m), m.d_model
  first, topk = retrieval_flop_terms("memory_plus", n_exp, d, s.heads, s.top_k, s.key_dim,
                                     s.num_memories, f"{KEY}.num_memories")
  return {
      **first,
      "memory_plus_values": n_exp * 2 * s.heads * s.top_k * d,  # Σ w · values[idx], V = D
      "memory_plus_gate": n_exp * 2 * d * d,                    # W_gate x
      "memory_plus_out": n_exp * 2 * d * d,                     # W_out (y ⊙ silu(.))
      **topk,
  }


def param_counts(m, n_exp: int, seq_len):
  if not n_exp:
    return 0, 0, 0.0
  s, d = section(m), m.d_model
  per_block = retrieval_params(d, s.heads, s.key_dim, s.num_memories, f"{KEY}.num_memories",
                               "rmsnorm", s.heads) + 2 * d * d  # + W_gate, W_out
  pools = 1 if s.shared_values else n_exp  # a shared pool counts once
  return n_exp * per_block, pools * s.num_memories * d, n_exp * s.heads * s.top_k * d


def table_shape(m, n_exp: int):
  s = section(m)
  # A shared pool is read by every block: its gradient has rows from all of them.
  readers = max(n_exp, 1) if s.shared_values else 1
  return s.num_memories, s.heads * s.top_k * readers


KIND = FFWKind(
    name=NAME, label="Memory+", section=NAME, defaults=default_config, build=build,
    validate=validate, validate_kernel=validate_kernel, flop_terms=flop_terms,
    param_counts=param_counts,
    gathered=lambda m, n: ({NAME: n * section(m).heads * section(m).top_k * m.d_model}
                           if n else {}),
    pool_size=lambda m: section(m).num_memories, table_shape=table_shape,
    table_names=("values_NV",), unsharded_names=("experts",), kernel_key=f"{KEY}.kernel",
    color="tab:purple")
