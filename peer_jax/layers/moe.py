"""Coarse-grained MoE with expert-choice routing (Zhou et al. 2022), the paper's MoE baseline.

    y_BTD, aux = MoE(...)(x_BTD, train=bool)

Router: probs_BTE = softmax(x W_r) over the E experts, in f32. Each sequence is a
routing group: expert e takes the C = min(T, ceil(T·capacity_factor/E)) tokens of the
sequence with the highest probs[:, :, e], runs its dense FFW (d_ff hidden units,
gelu/relu/swiglu as DenseFFW) on them, and adds gate·FFW_e(x) back at those positions.
A token may be picked by several experts or by none (then the layer outputs 0 for it and
only the residual path carries it).

Expert choice looks across the whole sequence: whether token t is processed depends on
the router scores of later tokens, so the layer is not causal (the paper's baseline has
the same property; at generation time the routing would differ). Keep that in mind when
comparing its perplexity with causal layers.

The gather of the chosen tokens and the scatter-add of the outputs use indices, not
one-hot (B, E, C, T) dispatch tensors. Expert weights are stacked: w_in (E, D, F),
w_out (E, F, D) with logical names ('experts', 'embed', 'mlp') / ('experts', 'mlp', 'embed').
Each expert is initialised like DenseFFW; the output is scaled by router probabilities
(~1/E at init), so the layer starts with a small output.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from peer_jax.layers.common import ACTIVATIONS, fan_in_normal, param
from peer_jax.layers.ffw import FFW_ACTIVATIONS


def expert_capacity(seq_len: int, num_experts: int, capacity_factor: float) -> int:
  """Tokens per expert per sequence: ceil(T·capacity_factor / E), clipped to [1, T]."""
  return max(1, min(seq_len, math.ceil(seq_len * capacity_factor / num_experts)))


class MoE(nnx.Module):
  """Expert-choice MoE of `num_experts` dense FFWs of width d_ff."""

  def __init__(self, d_model: int, *, num_experts: int, d_ff: int, capacity_factor: float = 1.0,
               activation: str = "gelu", rngs: nnx.Rngs, dtype=jnp.float32):
    if activation not in FFW_ACTIVATIONS:
      raise ValueError(f"unknown FFW activation {activation!r}; expected one of {FFW_ACTIVATIONS}")
    if capacity_factor <= 0:
      raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    E, D, F = num_experts, d_model, d_ff
    self.num_experts, self.capacity_factor = num_experts, capacity_factor
    self.activation, self.dtype = activation, dtype
    self.w_router_DE = param(rngs, fan_in_normal(D), (D, E), ("embed", "experts"))
    self.w_in_EDF = param(rngs, fan_in_normal(D), (E, D, F), ("experts", "embed", "mlp"))
    if activation == "swiglu":
      self.w_gate_EDF = param(rngs, fan_in_normal(D), (E, D, F), ("experts", "embed", "mlp"))
    self.w_out_EFD = param(rngs, fan_in_normal(F), (E, F, D), ("experts", "mlp", "embed"))

  def __call__(self, x_BTD, *, train: bool = False):
    del train
    B, T, D = x_BTD.shape
    E = self.num_experts
    C = expert_capacity(T, E, self.capacity_factor)
    x_BTD = x_BTD.astype(self.dtype)
    cast = lambda p: p[...].astype(self.dtype)

    logits_BTE = (x_BTD @ cast(self.w_router_DE)).astype(jnp.float32)
    probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
    # Expert choice: each expert takes its top-C tokens of the sequence.
    gate_BEC, tok_BEC = jax.lax.top_k(jnp.swapaxes(probs_BTE, 1, 2), C)

    x_BECD = jax.vmap(lambda xb, tb: xb[tb])(x_BTD, tok_BEC)
    h_BECF = jnp.einsum("becd,edf->becf", x_BECD, cast(self.w_in_EDF))
    if self.activation == "swiglu":
      g_BECF = jnp.einsum("becd,edf->becf", x_BECD, cast(self.w_gate_EDF))
      h_BECF = jax.nn.silu(g_BECF) * h_BECF
    else:
      h_BECF = ACTIVATIONS[self.activation](h_BECF)
    out_BECD = jnp.einsum("becf,efd->becd", h_BECF, cast(self.w_out_EFD))
    out_BECD = out_BECD.astype(jnp.float32) * gate_BEC[..., None]

    def combine(out_ECD, tok_EC):
      return jnp.zeros((T, D), jnp.float32).at[tok_EC.reshape(-1)].add(out_ECD.reshape(-1, D))

    y_BTD = jax.vmap(combine)(out_BECD, tok_BEC).astype(self.dtype)
    count_BT = jax.vmap(lambda t: jnp.zeros((T,), jnp.int32).at[t.reshape(-1)].add(1))(tok_BEC)
    aux = {
        "router_probs": probs_BTE,                                   # (B, T, E) f32
        "experts_per_token": count_BT,                               # (B, T) int32
        "dropped_fraction": jnp.mean((count_BT == 0).astype(jnp.float32)),  # () f32
    }
    return y_BTD, aux
