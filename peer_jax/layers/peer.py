"""PEER: Parameter Efficient Expert Retrieval (He 2024, "Mixture of A Million Experts").

    y_BTD, aux = PEER(...)(x_BTD, train=bool)

A query network (one linear map D -> heads·query_dim, then a query norm) gives every
token `heads` queries; each query retrieves its `top_k` best product keys out of
N = n² (exact top-k via `peer_jax.ops.product_key_topk`); the k retrieved scores are
turned into router weights (softmax or sigmoid); the retrieved experts are single
neurons e_i(x) = σ(u_i·x)·v_i (GLU: σ(g_i·x)·(u_i·x)·v_i), evaluated by the chunked
`peer_jax.ops.peer_experts` kernel, and everything is summed over heads and experts.

`ProductKeyRetrieval` (query network + norm + product keys + router) is shared with
the PKM baseline (`peer_jax.layers.pkm`).

Initialisation (target: output RMS of a dense FFW with d_ff = 4D, fan_in_normal init,
for an input with unit-variance features). Write a² = E[σ(z)²], z ~ N(0, 1):
a² ≈ 0.425 for GELU, 0.5 for ReLU.
* Dense: h = W_in x has unit variance (W_in std 1/√D); y = W_out σ(h) has variance
  d_ff · (1/d_ff) · a² = a² per feature.
* PEER: u_i std 1/√D, so u_i·x ~ N(0, 1) and σ(u_i·x) has second moment a² (keys and
  u are independent, so retrieval does not bias u_i·x). The h·k retrieved experts are
  (almost always) distinct, their v rows independent with std s_v, so
  Var(y_d) = a² · s_v² · Σ_heads Σ_k g².
  - softmax router: the k retrieved scores are close to each other at init (sub-keys
    std 1/√query_dim make every score ~N(0, 1), and the top-k of n² such scores sit
    within about one unit), so g ≈ 1/k and Σ_k g² ≈ 1/k: Var(y_d) ≈ a² s_v² h/k,
    hence s_v = √(k/h).
  - sigmoid router: the top scores are positive, g = sigmoid(score) ≈ 1, so
    Σ Σ g² ≈ h·k and s_v = 1/√(h·k).
  - GLU: E[σ(g·x)² (u·x)²] = a² · 1 for independent g, u, so the same s_v.
  This makes Var(y_d) ≈ a², like the dense FFW without its output scale. The blocks
  shrink the dense FFW's output by (2·num_layers)^-1/2 (`out_scale`), and the default
  `value_init='match_dense'` scales s_v by the same factor, so every FFW kind starts with
  the same residual contribution at any depth (checked in tests/test_layers.py against
  the dense FFW *with* its output scale). `value_init='embed'` is the paper's
  nn.Embed init (std 1/√D); docs/ablations.md compares the rules.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from peer_jax import sharding
from peer_jax.layers.common import ACTIVATIONS, fan_in_normal, param, rms_norm
from peer_jax.ops import product_key_topk

QUERY_NORMS = ("batchnorm", "layernorm", "rmsnorm", "none")
ROUTERS = ("softmax", "sigmoid")
PEER_ACTIVATIONS = ("gelu", "relu")
PLACEMENTS = ("replace", "parallel")  # the dense FFW's place: replaced, or kept beside PEER


def query_norm_params(query_norm: str, q_dim: int) -> int:
  """Learned parameters of a query norm over q_dim features (BatchNorm's running
  statistics are nnx.BatchStat, not Params)."""
  return {"batchnorm": 2, "layernorm": 2, "rmsnorm": 1, "none": 0}[query_norm] * q_dim


def exact_sqrt(num: int, what: str) -> int:
  """n with n² == num, or a ValueError (product keys need a perfect square)."""
  n = math.isqrt(num)
  if n * n != num:
    raise ValueError(f"{what} must be a perfect square (n² product keys), got {num}")
  return n


def router_weights(scores, router: str):
  """Router weights over the k retrieved scores (last axis), in f32."""
  scores = scores.astype(jnp.float32)
  if router == "softmax":
    return jax.nn.softmax(scores, axis=-1)
  if router == "sigmoid":
    return jax.nn.sigmoid(scores)
  raise ValueError(f"unknown router {router!r}; expected one of {ROUTERS}")


def value_init_std(heads: int, top_k: int, router: str) -> float:
  """Std of the output table so that Σ_heads Σ_k g·(unit-variance)·v has unit variance.

  See the module docstring: Σ Σ g² ≈ heads/top_k for softmax, heads·top_k for sigmoid.
  """
  return math.sqrt(top_k / heads) if router == "softmax" else 1.0 / math.sqrt(heads * top_k)


VALUE_INITS = ("match_dense", "match_dense_unscaled", "embed")


def table_init_std(rule: str, match_std: float, d_model: int, out_scale: float) -> float:
  """Std of an output table (PEER's v, PKM's values) under `rule`.

  * match_dense: the layer's output RMS at init equals the dense FFW's it replaces,
    *including* the block's depth-dependent output scale (`match_std` · out_scale), so
    every FFW kind starts with the same residual contribution.
  * match_dense_unscaled: `match_std` alone (the dense FFW's RMS without the depth
    scale; peer_jax's init before the fair-comparison review, kept for the ablation).
  * embed: 1/√d_model, Flax's nn.Embed default, which the paper's Algorithm 1 uses.
  """
  if rule == "match_dense":
    return match_std * out_scale
  if rule == "match_dense_unscaled":
    return match_std
  if rule == "embed":
    return d_model ** -0.5
  raise ValueError(f"unknown value_init {rule!r}; expected one of {VALUE_INITS}")


class ProductKeyRetrieval(nnx.Module):
  """Multi-head query network + product keys + router: x_BTD -> indices, weights.

  Parameters: w_q_DQ (D, heads·key_dim), the query norm's scale/bias, and two sub-key
  tables keys1/keys2 of shape (n, key_dim/2), or (heads, n, key_dim/2) with
  per_head_keys. With query_norm='batchnorm' the running mean/var are nnx.BatchStat.
  key_norm=True (Memory+'s qk-norm, with query_norm='rmsnorm'): every sub-key is
  RMS-normalised to 1/√key_dim, its init scale, before the scores, so scores cannot grow
  through the keys' norm.
  """

  def __init__(self, d_model: int, *, num_keys: int, heads: int, top_k: int, key_dim: int,
               query_norm: str = "batchnorm", per_head_keys: bool = False,
               router: str = "softmax", chunk_tokens: int | None = None,
               key_norm: bool = False, rngs: nnx.Rngs, dtype=jnp.float32):
    if query_norm not in QUERY_NORMS:
      raise ValueError(f"unknown query_norm {query_norm!r}; expected one of {QUERY_NORMS}")
    if router not in ROUTERS:
      raise ValueError(f"unknown router {router!r}; expected one of {ROUTERS}")
    if key_dim % 2:
      raise ValueError(f"query/key dim must be even (two halves), got {key_dim}")
    n = exact_sqrt(num_keys, "number of experts/memories")
    if not 1 <= top_k <= n:
      raise ValueError(f"need 1 <= top_k <= sqrt(N) = {n}, got top_k={top_k}")
    self.heads, self.top_k, self.key_dim, self.n = heads, top_k, key_dim, n
    self.query_norm, self.router, self.dtype = query_norm, router, dtype
    self.per_head_keys, self.chunk_tokens = per_head_keys, chunk_tokens
    self.key_norm = key_norm
    q_dim = heads * key_dim
    self.w_q_DQ = param(rngs, fan_in_normal(d_model), (d_model, q_dim), ("embed", "heads_q"))
    if query_norm == "batchnorm":
      # Statistics over all tokens of the batch (B·T) per query feature; computed in f32.
      self.query_bn = nnx.BatchNorm(
          q_dim, momentum=0.99, epsilon=1e-5, dtype=jnp.float32, rngs=rngs,
          scale_metadata={"out_sharding": ("heads_q",)},
          bias_metadata={"out_sharding": ("heads_q",)})
    elif query_norm in ("layernorm", "rmsnorm"):
      self.norm_scale_Q = param(rngs, nnx.initializers.ones, (q_dim,), ("heads_q",))
      if query_norm == "layernorm":
        self.norm_bias_Q = param(rngs, nnx.initializers.zeros, (q_dim,), ("heads_q",))
    # Sub-key std 1/√key_dim: with unit-variance queries every full score
    # q1·c1 + q2·c2 (key_dim terms) has unit variance.
    key_init = fan_in_normal(key_dim)
    if per_head_keys:
      shape, names = (heads, n, key_dim // 2), ("key_heads", "sub_keys", "key_half")
    else:
      shape, names = (n, key_dim // 2), ("sub_keys", "key_half")
    self.keys1 = param(rngs, key_init, shape, names)
    self.keys2 = param(rngs, key_init, shape, names)

  def queries(self, x_BTD, *, train: bool):
    """Normalised queries (B, T, heads, key_dim) in f32."""
    q_BTQ = x_BTD.astype(self.dtype) @ self.w_q_DQ[...].astype(self.dtype)
    q_BTQ = q_BTQ.astype(jnp.float32)
    if self.query_norm == "batchnorm":
      q_BTQ = self.query_bn(q_BTQ, use_running_average=not train)
    q_BTHd = q_BTQ.reshape(*q_BTQ.shape[:-1], self.heads, self.key_dim)
    if self.query_norm in ("layernorm", "rmsnorm"):  # per head, over its key_dim features
      if self.query_norm == "layernorm":
        q_BTHd = q_BTHd - jnp.mean(q_BTHd, axis=-1, keepdims=True)
      q_BTHd = rms_norm(q_BTHd, None, eps=1e-5)
      q_BTHd = q_BTHd * self.norm_scale_Q[...].reshape(self.heads, self.key_dim)
      if self.query_norm == "layernorm":
        q_BTHd = q_BTHd + self.norm_bias_Q[...].reshape(self.heads, self.key_dim)
    return q_BTHd

  def sub_keys(self):
    """The two sub-key tables as the scores use them (normalised with key_norm), in dtype."""
    c1, c2 = self.keys1[...], self.keys2[...]
    if self.key_norm:
      c1, c2 = (rms_norm(c, None, eps=1e-6) * self.key_dim ** -0.5 for c in (c1, c2))
    return c1.astype(self.dtype), c2.astype(self.dtype)

  def __call__(self, x_BTD, *, train: bool = False):
    """Returns (scores, indices int32, router weights f32), each (B, T, heads, top_k)."""
    q_BTHd = self.queries(x_BTD, train=train).astype(self.dtype)
    half = self.key_dim // 2
    c1, c2 = self.sub_keys()
    # The FFI top-k has no partitioning rule, and chunking reshapes the token axes: both
    # only where the program is not split over devices (GSPMD would regather).
    ctx = sharding.current_rules()
    single_device = ctx is None or ctx.mesh.size == 1
    chunk_rows = None
    if single_device and self.chunk_tokens:
      chunk_rows = self.chunk_tokens * (1 if self.per_head_keys else self.heads)
    scores_BTHK, idx_BTHK = product_key_topk(q_BTHd[..., :half], q_BTHd[..., half:], c1, c2,
                                             self.top_k, fast_cpu_topk=single_device,
                                             chunk_size=chunk_rows)
    return scores_BTHK, idx_BTHK, router_weights(scores_BTHK, self.router)


class PEER(nnx.Module):
  """PEER layer: `heads` product-key retrievals of `top_k` singleton experts out of N.

  Expert tables u_ND, v_ND (and g_ND with glu) of shape (num_experts, d_model), logical
  names ('experts', 'expert_embed'). The tables are passed to the expert kernel as
  stored (not cast to `dtype` as a whole: that would materialise an N×D copy every
  step); the kernel gathers the needed rows and computes in at least f32, and the
  output is cast to `dtype`.
  """

  def __init__(self, d_model: int, *, num_experts: int, heads: int, top_k: int, query_dim: int,
               query_norm: str = "batchnorm", per_head_keys: bool = False,
               router: str = "softmax", activation: str = "gelu", glu: bool = False,
               chunk_size: int = 512, value_init: str = "match_dense", out_scale: float = 1.0,
               kernel: str = "auto", interpret: str | None = None,
               rngs: nnx.Rngs, dtype=jnp.float32):
    from peer_jax.ops.kernels import KERNELS, INTERPRETS
    if kernel not in KERNELS:
      raise ValueError(f"model.peer.kernel: unknown value {kernel!r}; expected one of {KERNELS}")
    if interpret is not None and interpret not in INTERPRETS:
      raise ValueError(f"PEER interpret must be None or one of {INTERPRETS}, got {interpret!r}")
    # kernel: model.peer.kernel (peer_jax/ops/kernels.py). interpret: 'tpu' | 'gpu' runs
    # that Pallas kernel in interpret mode (tests on CPU); None: compiled.
    self.kernel, self.interpret = kernel, interpret
    if activation not in PEER_ACTIVATIONS:
      raise ValueError(f"unknown PEER activation {activation!r}; expected {PEER_ACTIVATIONS}")
    self.retrieval = ProductKeyRetrieval(
        d_model, num_keys=num_experts, heads=heads, top_k=top_k, key_dim=query_dim,
        query_norm=query_norm, per_head_keys=per_head_keys, router=router,
        chunk_tokens=chunk_size, rngs=rngs, dtype=dtype)
    self.activation, self.glu, self.chunk_size, self.dtype = activation, glu, chunk_size, dtype
    names = ("experts", "expert_embed")
    shape = (num_experts, d_model)
    self.u_ND = param(rngs, fan_in_normal(d_model), shape, names)
    if glu:
      self.g_ND = param(rngs, fan_in_normal(d_model), shape, names)
    v_std = table_init_std(value_init, value_init_std(heads, top_k, router), d_model, out_scale)
    self.v_ND = param(rngs, nnx.initializers.normal(stddev=v_std), shape, names)

  def __call__(self, x_BTD, *, train: bool = False, segment_ids_BT=None, decode: bool = False):
    del segment_ids_BT, decode
    B, T, D = x_BTD.shape
    x_BTD = sharding.constrain(x_BTD.astype(self.dtype), ("batch", "length", "embed"))
    _, idx_BTHK, w_BTHK = self.retrieval(x_BTD, train=train)
    H, K = idx_BTHK.shape[-2:]
    x_TD = x_BTD.reshape(B * T, D)
    idx_THK = idx_BTHK.reshape(B * T, H, K)
    w_THK = w_BTHK.reshape(B * T, H, K)
    act = ACTIVATIONS[self.activation]
    from peer_jax.ops import kernels
    ctx = sharding.current_rules()
    multi = ctx is not None and ctx.mesh.size > 1
    model_axes = ctx.axes("expert_embed") if multi else ()
    model_shards = 1
    if multi:
      sizes = sharding.mesh_axis_sizes(ctx.mesh)
      model_shards = math.prod(sizes[a] for a in model_axes)
    impl, why = kernels.resolve_kernel(
        self.kernel, glu=self.glu, d_model=D, slots=H * K, model_shards=model_shards,
        num_devices=ctx.mesh.size if multi else 1, table_dtype=self.u_ND[...].dtype,
        interpret=self.interpret)
    kernels.log_choice(impl, why, self.kernel)
    interpret = kernels.interpret_mode(self.interpret) is not None
    ins = (self.u_ND[...], self.g_ND[...]) if self.glu else (self.u_ND[...],)
    if multi:
      # Under a multi-device mesh: the D-sharded bank (peer_jax/ops/sharded_experts.py),
      # the chosen kernels per shard inside its shard_map.
      from peer_jax.ops.sharded_experts import sharded_peer_experts
      y_TD = sharded_peer_experts(
          x_TD, idx_THK, w_THK, self.u_ND[...], self.v_ND[...], act, mesh=ctx.mesh,
          model_axes=model_axes, token_axes=ctx.axes("batch"),
          g=self.g_ND[...] if self.glu else None, chunk_size=self.chunk_size, impl=impl,
          interpret=interpret)
    else:  # one device (auto: the fused FFI kernels on CPU for f32, Pallas on TPU / GPU)
      y_TD = kernels.expert_mixture(impl, x_TD, idx_THK, w_THK, ins, self.v_ND[...], act,
                                    chunk_size=self.chunk_size, interpret=interpret,
                                    auto=self.kernel == "auto")
    aux = {"expert_indices": idx_BTHK, "expert_weights": w_BTHK}
    return y_TD.reshape(B, T, D).astype(self.dtype), aux
