"""Dense feed-forward block: GELU/ReLU MLP or SwiGLU.

All FFW-kind layers (dense, moe, pkm, peer) share one calling convention so that a
block can hold any of them:

    y_BTD, aux = layer(x_BTD, train=bool, segment_ids_BT=None, decode=False)

`segment_ids_BT` marks padding (0) for layers that route over the sequence (MoE);
`decode=True` says the tokens are decoded one step at a time (Transformer.extend).
`aux` is a dict of arrays the trainer may log or the evaluator aggregate (expert
indices and weights, auxiliary losses); a dense FFW returns an empty dict.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from peer_jax.layers.common import ACTIVATIONS, fan_in_normal, param

FFW_ACTIVATIONS = ("gelu", "relu", "swiglu")


class DenseFFW(nnx.Module):
  """x -> W_out · act(W_in · x); with `swiglu`, W_out · (silu(W_gate·x) * W_in·x)."""

  def __init__(self, d_model: int, d_ff: int, activation: str, *, rngs: nnx.Rngs,
               dtype=jnp.float32, out_scale: float = 1.0):
    if activation not in FFW_ACTIVATIONS:
      raise ValueError(f"unknown FFW activation {activation!r}; expected one of {FFW_ACTIVATIONS}")
    self.activation = activation
    self.dtype = dtype
    self.w_in_DF = param(rngs, fan_in_normal(d_model), (d_model, d_ff), ("embed", "mlp"))
    if activation == "swiglu":
      self.w_gate_DF = param(rngs, fan_in_normal(d_model), (d_model, d_ff), ("embed", "mlp"))
    # out_scale lets deep stacks shrink the residual contribution of each block at init.
    self.w_out_FD = param(rngs, fan_in_normal(d_ff, out_scale), (d_ff, d_model), ("mlp", "embed"))

  def __call__(self, x_BTD: jax.Array, *, train: bool = False, segment_ids_BT=None,
               decode: bool = False):
    del train, segment_ids_BT, decode
    x_BTD = x_BTD.astype(self.dtype)
    h_BTF = x_BTD @ self.w_in_DF[...].astype(self.dtype)
    if self.activation == "swiglu":
      h_BTF = jax.nn.silu(x_BTD @ self.w_gate_DF[...].astype(self.dtype)) * h_BTF
    else:
      h_BTF = ACTIVATIONS[self.activation](h_BTF)
    return h_BTF @ self.w_out_FD[...].astype(self.dtype), {}
