"""Expert usage and unevenness (PEER paper, Table 2). Pure, jit-able functions.

Accumulate router weights per expert over any number of steps with
`accumulate_expert_weights` (sum the z_N of several batches), then:
* usage = share of experts whose accumulated router weight is nonzero;
* unevenness = KL(z ‖ uniform) = log N + Σ_i z_i log z_i, z normalised to sum 1,
  with 0 log 0 = 0 (0 for perfectly even use, log N when one expert takes everything).
"""

import jax
import jax.numpy as jnp


def accumulate_expert_weights(indices, weights, num_experts: int):
  """z_N: sum of the router weights each expert received (f32). indices/weights any shape."""
  return jax.ops.segment_sum(weights.reshape(-1).astype(jnp.float32),
                             indices.reshape(-1).astype(jnp.int32), num_segments=num_experts)


def expert_usage(z_N):
  """Share of experts with a nonzero accumulated router weight."""
  return jnp.mean((z_N > 0).astype(jnp.float32))


def expert_unevenness(z_N):
  """KL(z/Σz ‖ uniform) = log N + Σ p log p, 0 log 0 = 0 (nan-free for z = 0)."""
  z_N = z_N.astype(jnp.float32)
  p_N = z_N / jnp.maximum(jnp.sum(z_N), jnp.finfo(jnp.float32).tiny)
  safe = jnp.where(p_N > 0, p_N, 1.0)
  return jnp.log(z_N.shape[0]).astype(jnp.float32) + jnp.sum(jnp.where(p_N > 0, p_N * jnp.log(safe), 0.0))


def expert_pools(model_cfg) -> dict[str, int]:
  """{block name: experts it chooses among} of every block whose FFW retrieves experts
  (the kind's pool size; {} for kinds without usage statistics, e.g. dense and MoE)."""
  from peer_jax import kinds
  from peer_jax.model import expert_layer_indices
  n = kinds.get(model_cfg.ffw).pool_size(model_cfg)
  if n is None:
    return {}
  return {f"block_{i}": int(n)
          for i in expert_layer_indices(model_cfg.ffw_layers, model_cfg.num_layers)}


def expert_stats(aux, num_experts: int):
  """{'usage', 'unevenness'} of one step from an aux dict with expert_indices/weights."""
  z_N = accumulate_expert_weights(aux["expert_indices"], aux["expert_weights"], num_experts)
  return {"usage": expert_usage(z_N), "unevenness": expert_unevenness(z_N)}
