"""PEER (peer_jax.layers.peer): product-key retrieval of single-neuron experts. `model.peer`."""

import math

from peer_jax.kinds.base import FFWKind
from peer_jax.kinds.retrieval_cost import retrieval_flop_terms, retrieval_params
from peer_jax.layers.peer import (PEER, PEER_ACTIVATIONS, PLACEMENTS, QUERY_NORMS, ROUTERS,
                                  VALUE_INITS)


def build(m, *, rngs, dtype, out_scale, shared=None):
  p = m.peer
  return PEER(m.d_model, num_experts=p.num_experts, heads=p.heads, top_k=p.top_k,
              query_dim=p.query_dim, query_norm=p.query_norm, per_head_keys=p.per_head_keys,
              router=p.router, activation=p.activation, glu=p.glu, chunk_size=p.chunk_size,
              value_init=p.get("value_init", "match_dense"), out_scale=out_scale,
              kernel=p.get("kernel", "auto"), rngs=rngs, dtype=dtype)


def validate(cfg, checks):
  checks.product_keys(cfg, "model.peer", "num_experts", "query_dim")
  checks.choice(cfg, "model.peer.query_norm", QUERY_NORMS)
  checks.choice(cfg, "model.peer.router", ROUTERS)
  checks.choice(cfg, "model.peer.activation", PEER_ACTIVATIONS)
  checks.choice(cfg, "model.peer.placement", PLACEMENTS)
  checks.positive_int(cfg, "model.peer.chunk_size")
  checks.choice(cfg, "model.peer.value_init", VALUE_INITS)
  checks.kernel(cfg, "model.peer.kernel")


def validate_kernel(cfg, *, sizes, rules, num_devices, platform):
  from peer_jax import sharding
  from peer_jax.ops.kernels import resolve_kernel
  p = cfg.model.peer
  if "kernel" not in p:
    return
  shards = math.prod(sizes.get(a, 1) for a in sharding.rule_axes(rules, "expert_embed"))
  resolve_kernel(p.kernel, glu=bool(p.glu), d_model=cfg.model.d_model,
                 slots=p.heads * p.top_k, model_shards=shards if num_devices > 1 else 1,
                 num_devices=num_devices, platform=platform)


def flop_terms(m, n_exp: int, seq_len: int) -> dict:
  if not n_exp:
    return {}
  p, d = m.peer, m.d_model
  h, k = p.heads, p.top_k
  first, topk = retrieval_flop_terms("peer", n_exp, d, h, k, p.query_dim, p.num_experts,
                                     "model.peer.num_experts")
  return {
      **first,
      # u_i·x for h·k experts (2·h·k·D; GLU adds g_i·x), then Σ w·σ·v_i (2·h·k·D).
      "peer_experts_in": n_exp * (4 if p.glu else 2) * h * k * d,
      "peer_experts_out": n_exp * 2 * h * k * d,
      **topk,
  }


def param_counts(m, n_exp: int, seq_len):
  if not n_exp:
    return 0, 0, 0.0
  p, d = m.peer, m.d_model
  retrieval = retrieval_params(d, p.heads, p.query_dim, p.num_experts, "model.peer.num_experts",
                               p.query_norm, p.heads if p.per_head_keys else 1)
  rows = 3 if p.glu else 2
  return (n_exp * retrieval, n_exp * rows * p.num_experts * d,
          n_exp * rows * p.heads * p.top_k * d)


KIND = FFWKind(
    name="peer", label="PEER", section="peer", build=build, validate=validate,
    validate_kernel=validate_kernel, flop_terms=flop_terms, param_counts=param_counts,
    # placement='parallel': a dense FFW beside the PEER layer, summed.
    dense_ffws=lambda m: 1 if m.peer.placement == "parallel" else 0,
    parallel_dense=lambda m: m.peer.placement == "parallel",
    gathered=lambda m, n: ({"peer": n * (3 if m.peer.glu else 2) * m.peer.heads
                            * m.peer.top_k * m.d_model} if n else {}),
    pool_size=lambda m: m.peer.num_experts,
    table_shape=lambda m, n: (m.peer.num_experts, m.peer.heads * m.peer.top_k),
    table_names=("u_ND", "v_ND", "g_ND"), unsharded_names=("experts",),
    kernel_key="model.peer.kernel", color="tab:red")
